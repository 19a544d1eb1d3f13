"""HexRay's language server: per-token attribution for prompt files in an editor.

    hexray lsp                     stdio (what editors start)
    hexray lsp --tcp 127.0.0.1:2087

Modules, one feature each over one document-and-trace model:

    cli           the entry point (`hexray lsp`, `python -m hexray_lsp`): options, logging, start
    transport     the JSON-RPC message loop: bounded messages, error answers for what does not parse
    ids           command ids and the diagnostics' source, defined once
    server        HexRayServer, create_server(): document lifecycle, settings, diagnostics publishing;
                  module-level handlers behind one guard decorator
    settings      typed settings with defaults (bad values fall back and are reported)
    documents     open documents, which ones are served, binary/too-large checks
    line_index    exact LSP positions (utf-8/16/32, LSP line breaks only) <-> string offsets
    traces        where a document's trace is, loading it off the loop, fresh vs stale
    trace_view    one run of a trace: tokens, spans, per-token probability/rank/contributor
    hover         the hover Markdown
    sources       which earlier tokens a token's prediction came from: the hover's Sources, documentHighlight
    inlay_hints   one figure per token, and the resolve tooltip
    diagnostics   no trace / stale / unreadable / kit missing / surprising tokens
    code_lens     "record trace" / "cancel" on the first line
    commands      hexray.recordTrace (progress, cancellation, record on save), status, restart
    worker        the client of the record worker subprocess (start, restart, requests, crashes)
    (the record worker itself is hexray_core.record.worker, started as hexray.record_worker: it keeps the model
    loaded and imports torch)
    protocol      pre-serialised results for large inlay-hint lists

The server process imports pygls, numpy and hexray_core.replay only; never torch.
"""
