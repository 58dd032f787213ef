"""Scripts and configs that reproduce the DP-MemArc paper's single-site tables and figures."""
