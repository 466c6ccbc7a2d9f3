"""bll_ref: a NumPy reference implementation of Block-Local Learning (BLL)."""
__version__ = "0.1.0"
