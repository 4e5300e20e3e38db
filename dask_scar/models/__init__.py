"""Models: pure maths on NumPy or CuPy arrays; they know nothing of Dask."""

from ._base import ColumnSummary, Contribution, DataSummary, Model, ParameterSpec
from .factorization import MatrixFactorization
from .linear import LinearRegression
from .softmax import SoftmaxRegression

__all__ = [
    "ColumnSummary",
    "Contribution",
    "DataSummary",
    "LinearRegression",
    "MatrixFactorization",
    "Model",
    "ParameterSpec",
    "SoftmaxRegression",
]
