"""Layer 3: spectral sampling — prompt representations read through the TransformerLens bridge,
spectral embedding, k-center clusters, coverage picks and length-matched pairs for stages 4, 5, 7.
Imports layers 0-2.
"""
