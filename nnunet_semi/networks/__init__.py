"""Network extensions of nnU-Net's architectures used by the methods (their modules and state-dict keys stay
those of ``build_network_architecture``'s network wherever the network is exported)."""
