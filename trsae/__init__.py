"""Temporal-Relational Sparse Autoencoders (TRSAE).

Data flows one way: text (`data`) -> contexts -> activations (`lm`, `store`) -> SAE (`saes`, `temporal`,
`train`) -> metrics (`metrics`, `evals`) -> figures and paper macros (`report`).
"""

__version__ = "0.1.0"
