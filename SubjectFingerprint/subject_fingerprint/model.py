"""The fingerprint network: a MONAI ResNet whose classification head is the embedding."""

from __future__ import annotations

# depth -> (block type, blocks per stage), as in He et al. 2016.
RESNET_LAYOUTS = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
}


def build_network(spatial_dims: int = 2, depth: int = 50, embedding_dim: int = 128):
    """Return an untrained ResNet mapping ``(B, 1, *size)`` to ``(B, embedding_dim)``.

    Standard ResNet stem (7-wide first convolution with stride 2, then max pooling), one
    input channel, and the final fully connected layer sized to the embedding.
    """
    from monai.networks.nets import ResNet

    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, not {spatial_dims!r}")
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYOUTS)}, not {depth!r}")
    if int(embedding_dim) < 1:
        raise ValueError(f"embedding_dim must be positive, not {embedding_dim!r}")
    block, layers = RESNET_LAYOUTS[depth]
    return ResNet(
        block=block,
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=spatial_dims,
        n_input_channels=1,
        conv1_t_size=7,
        conv1_t_stride=2,
        num_classes=int(embedding_dim),
    )
