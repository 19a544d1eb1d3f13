"""HexRay's trace viewer: the browser page behind `hexray view`, `hexray report`, notebook cells and
the VS Code webview. Every figure comes from `hexray_core.replay` (numpy only; never torch).

    data      one JSON-ready dict per panel, from the replay engine
    page      the built front end (static/, from viewer/ in the repository) inlined into one HTML page
    report    a self-contained HTML report with a bounded payload
    server    the loopback server of `hexray view` (random token, only the named traces)
    notebook  `_repr_html_` and `show()` for Jupyter
"""
