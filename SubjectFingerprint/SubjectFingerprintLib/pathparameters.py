"""Path parameters of a panel: kept in the parameter node (saved with the scene) and remembered
in QSettings (the paths used last time fill a new scene's empty ones). Shared by both modules' widgets."""

import vtk


class PathParametersWidgetMixin:
    """The panel side of the parameter node, shared by both modules' widgets.

    ``setParameterNode`` binds the .ui (``connectGui``) and observes the node; the path line
    edits named in ``PATH_PARAMETERS`` are synced by hand both ways (node -> line edits in
    ``onParameterNodeModified``, line edits -> node and QSettings in ``onPathsChanged``, which
    the widget connects to each line edit's ``currentPathChanged(QString)``).
    The widget provides ``logic.getParameterNode()``, ``ui``, ``_updateButtons`` and
    ``addObserver``/``removeObserver`` (``slicer.util.VTKObservationMixin``).
    """

    PATH_PARAMETERS = {}  # ctkPathLineEdit name in the .ui -> parameter name
    SETTINGS_PREFIX = ""  # QSettings key prefix, e.g. "SubjectFingerprint/"
    _parameterNode = None
    _parameterNodeGuiTag = None
    _showingNodePaths = False  # True while onParameterNodeModified sets the line edits

    # -- hooks for what differs between the panels ---------------------------------------------
    def _initializeExtraParameters(self, node) -> None:
        """Fill other empty parameters of a new scene's node (called before it is set)."""

    def _savePathSettings(self, settings) -> None:
        """Remember other widgets' values in ``settings`` (called by ``onPathsChanged``)."""

    # -- parameter node ---------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        import qt

        node = self.logic.getParameterNode()
        settings = qt.QSettings()
        for parameter in self.PATH_PARAMETERS.values():
            if not getattr(node, parameter):  # a new scene: the paths used last time
                setattr(node, parameter, settings.value(self.SETTINGS_PREFIX + parameter, "") or "")
        self._initializeExtraParameters(node)
        self.setParameterNode(node)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Paths from the parameter node into their line edits (a loaded scene restores them).

        Setting a line edit emits its currentPathChanged at once; onPathsChanged waits until
        every line edit shows the node, else it would copy the ones not set yet into the node.
        """
        if self._parameterNode:
            changed = False
            self._showingNodePaths = True
            try:
                for widgetName, parameter in self.PATH_PARAMETERS.items():
                    widget = getattr(self.ui, widgetName)
                    value = getattr(self._parameterNode, parameter) or ""
                    if widget.currentPath != value:
                        widget.currentPath = value
                        changed = True
            finally:
                self._showingNodePaths = False
            if changed:
                self.onPathsChanged()  # QSettings remember what the line edits now show
        self._updateButtons()

    def onPathsChanged(self, _path=None) -> None:
        """Line edits into the parameter node (when there is one) and into QSettings (always)."""
        import qt

        if self._showingNodePaths:
            return
        settings = qt.QSettings()
        for widgetName, parameter in self.PATH_PARAMETERS.items():
            value = getattr(self.ui, widgetName).currentPath
            if self._parameterNode and getattr(self._parameterNode, parameter) != value:
                setattr(self._parameterNode, parameter, value)
            settings.setValue(self.SETTINGS_PREFIX + parameter, value)
        self._savePathSettings(settings)
        self._updateButtons()
