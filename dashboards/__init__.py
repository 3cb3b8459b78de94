"""Figures (pure functions: trace model -> plotly figure) and the Dash app that wires them."""
