"""Temporal-Relational Sparse Autoencoders (TRSAE).

Data flows one way: text (`data`) -> contexts -> activations (`lm`, `store`) -> SAE (`saes`, `train`) -> metrics
(`metrics`, `evaluate`, `evals`, `overhead`) -> figures and paper macros (`experiments`, `cache`, `analysis`,
`report`) -> paper (`paper`). The README's code map says what each module holds.
"""

__version__ = "0.1.0"
