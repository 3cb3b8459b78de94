"""Renderers: Analysis -> terminal text (terminal.py), JSON (jsonout.py), Markdown (markdown.py)."""
