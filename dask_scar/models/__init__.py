"""Models: pure maths on NumPy or CuPy arrays; they know nothing of Dask."""

from ._base import LOCAL_STATE, ColumnSummary, Contribution, DataSummary, Model, ParameterSpec
from .factorization import MatrixFactorization
from .lda import LDA
from .linear import LinearRegression
from .softmax import SoftmaxRegression

__all__ = [
    "LOCAL_STATE",
    "ColumnSummary",
    "Contribution",
    "DataSummary",
    "LDA",
    "LinearRegression",
    "MatrixFactorization",
    "Model",
    "ParameterSpec",
    "SoftmaxRegression",
]
