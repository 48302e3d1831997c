"""tnt: experiments and ablations with Transformer in Transformer (Han et al., NeurIPS 2021)."""

__version__ = "0.1.0"
