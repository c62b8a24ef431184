"""nmt-moe: neural machine translation with sparsely-gated Mixture-of-Experts layers."""

__version__ = "0.1.0"
