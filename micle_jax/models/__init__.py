"""Networks: the SimCLR ResNet, its heads, and the one convolution layer."""
