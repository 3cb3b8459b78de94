"""Renderers: Analysis -> terminal text, JSON, Markdown. Picked by name (RENDERERS)."""

RENDERERS = {
    "terminal": "gpudoctor.render.terminal:render",
    "json": "gpudoctor.render.jsonout:render",
    "markdown": "gpudoctor.render.markdown:render",
}
