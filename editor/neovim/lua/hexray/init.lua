-- HexRay for Neovim: per-token attribution in *.prompt files from `hexray lsp`.
--
--   require('hexray').setup({
--     cmd = { 'hexray', 'lsp' },             -- or { '/path/to/venv/bin/python', '-m', 'hexray_core', 'lsp' }
--     settings = { model = 'gpt2', device = 'cpu', inlayHints = 'probability',
--                  hover = { predictions = 5 }, recordOptions = { top_k = 20 } },
--   })
--
-- Settings are the server's (hexray_lsp/settings.py, camelCase); they are sent as initializationOptions
-- and answer the server's `workspace/configuration` request for section "hexray".
-- Works with Neovim 0.7 (Debian 12) through 0.11+.
--
-- Commands: :HexRayRecord, :HexRayCancel, :HexRayStatus, :HexRayRestartWorker, :HexRayRestart.
-- `K` shows the hover (mapped for the prompt buffer on Neovim < 0.10, where it is not the default);
-- inlay hints are turned on for prompt buffers on Neovim >= 0.10.

local M = {}

M.filetype = 'hexray-prompt'

M.defaults = {
  cmd = { 'hexray', 'lsp' },
  settings = {},
  inlay_hints = true,
  root_markers = { '.git', 'pyproject.toml', '.hexray' },
  hover_key = 'K',
  source_highlights = true, -- highlight the source tokens of the token under the cursor (CursorHold)
  on_attach = nil, -- function(client, bufnr), called after HexRay's own setup of the buffer
}

M.config = vim.deepcopy(M.defaults)

local uv = vim.loop or vim.uv

-- Neovim 0.11 made client methods take `self` (client:request); the 0.7-0.10 form is client.request.
local method_style = vim.fn.has('nvim-0.11') == 1

local function request(client, method, params, handler, bufnr)
  if method_style then return client:request(method, params, handler, bufnr) end
  return client.request(method, params, handler, bufnr)
end

local function stop(client)
  if method_style then return client:stop() end
  return client.stop()
end

local function notify(msg, level)
  vim.notify('HexRay: ' .. msg, level or vim.log.levels.INFO)
end

--- HexRay clients attached to `bufnr` (0: current buffer), on any Neovim version.
function M.clients(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local all
  if vim.lsp.get_clients then
    all = vim.lsp.get_clients({ bufnr = bufnr })
  elseif vim.lsp.get_active_clients then
    all = vim.lsp.get_active_clients({ bufnr = bufnr })
  else
    all = vim.tbl_values(vim.lsp.buf_get_clients(bufnr))
  end
  return vim.tbl_filter(function(c) return c.name == 'hexray' end, all)
end

local function root_dir(fname)
  local start = vim.fn.fnamemodify(fname, ':p:h')
  if vim.fs and vim.fs.find then
    local found = vim.fs.find(M.config.root_markers, { path = start, upward = true })[1]
    if found then return vim.fs.dirname(found) end
  else
    for _, marker in ipairs(M.config.root_markers) do
      local d = vim.fn.finddir(marker, start .. ';')
      local f = vim.fn.findfile(marker, start .. ';')
      local hit = d ~= '' and d or f
      if hit ~= '' then return vim.fn.fnamemodify(hit, ':p:h:h') end
    end
  end
  return start
end

local function on_attach(client, bufnr)
  if vim.fn.has('nvim-0.10') == 0 and M.config.hover_key then
    vim.api.nvim_buf_set_keymap(bufnr, 'n', M.config.hover_key, '<cmd>lua vim.lsp.buf.hover()<CR>',
      { noremap = true, silent = true, desc = 'HexRay: token hover' })
  end
  if M.config.inlay_hints and vim.lsp.inlay_hint and vim.lsp.inlay_hint.enable then
    pcall(vim.lsp.inlay_hint.enable, true, { bufnr = bufnr })
  end
  -- Neovim asks for textDocument/documentHighlight only when told to: on CursorHold (after 'updatetime').
  if M.config.source_highlights and vim.api.nvim_create_autocmd and client.server_capabilities
      and client.server_capabilities.documentHighlightProvider then
    local group = vim.api.nvim_create_augroup('hexray_highlight_' .. bufnr, { clear = true })
    vim.api.nvim_create_autocmd({ 'CursorHold', 'CursorHoldI' }, {
      group = group, buffer = bufnr, callback = function() pcall(vim.lsp.buf.document_highlight) end })
    vim.api.nvim_create_autocmd({ 'CursorMoved', 'CursorMovedI', 'BufLeave' }, {
      group = group, buffer = bufnr, callback = function() pcall(vim.lsp.buf.clear_references) end })
  end
  if M.config.on_attach then M.config.on_attach(client, bufnr) end
end

local started = {} -- Neovim 0.7: root_dir -> client id

--- Starts (or reuses) the server for a prompt buffer and attaches it.
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and vim.api.nvim_get_current_buf() or bufnr
  local fname = vim.api.nvim_buf_get_name(bufnr)
  local root = root_dir(fname ~= '' and fname or uv.cwd())
  -- an empty Lua table would be sent as a JSON array
  local settings = vim.tbl_isempty(M.config.settings) and vim.empty_dict() or M.config.settings
  local config = {
    name = 'hexray',
    cmd = M.config.cmd,
    root_dir = root,
    workspace_folders = { { uri = vim.uri_from_fname(root), name = root } },
    init_options = settings,
    settings = { hexray = settings },
    on_attach = on_attach,
  }
  if vim.lsp.start then -- 0.8+: reuses a running client with the same name and root
    return vim.lsp.start(config, { bufnr = bufnr })
  end
  local id = started[root]
  if not id or vim.lsp.client_is_stopped(id) then
    id = vim.lsp.start_client(config)
    started[root] = id
  end
  if id then vim.lsp.buf_attach_client(bufnr, id) end
  return id
end

--- Runs one of the server's commands for the current buffer; `callback(err, result)` is optional.
function M.execute(command, with_uri, callback)
  local bufnr = vim.api.nvim_get_current_buf()
  local client = M.clients(bufnr)[1]
  if not client then
    notify('no HexRay server for this buffer (is it a .prompt file? see :checkhealth vim.lsp / :LspInfo)',
      vim.log.levels.WARN)
    return
  end
  local params = { command = command, arguments = with_uri and { vim.uri_from_bufnr(bufnr) } or {} }
  request(client, 'workspace/executeCommand', params, function(err, result)
    if callback then return callback(err, result) end
    if err then notify(command .. ' failed: ' .. (err.message or vim.inspect(err)), vim.log.levels.ERROR) end
  end, bufnr)
end

function M.record()
  M.execute('hexray.recordTrace', true, function(err, res)
    if err then
      notify('recording failed: ' .. (err.message or vim.inspect(err)), vim.log.levels.ERROR)
    elseif res and res.status == 'recorded' then
      notify(string.format('recorded %s tokens in %.1f s -> %s', tostring(res.tokens), tonumber(res.seconds) or 0,
        tostring(res.path)))
    elseif res then
      notify((res.status or 'done') .. (res.message and (': ' .. res.message) or ''), vim.log.levels.WARN)
    end
  end)
end

--- The trace state of the current buffer, from the server ("fresh", "stale", "none", "error", "loading").
function M.status(callback)
  local uri = vim.uri_from_bufnr(0)
  M.execute('hexray.status', false, function(err, res)
    local doc = (not err and res and res.documents) and res.documents[uri] or nil
    local state = doc and (doc.recording and 'recording' or doc.state) or 'unknown'
    if callback then return callback(state, res, err) end
    notify(string.format('trace %s%s (model %s)', state, doc and doc.trace and (' · ' .. doc.trace) or '',
      res and res.settings and res.settings.model or '?'))
  end)
end

--- For a statusline: the trace state from the diagnostics HexRay publishes (no request).
function M.statusline(bufnr)
  if #M.clients(bufnr or 0) == 0 then return '' end
  local state = 'trace'
  for _, d in ipairs(vim.diagnostic.get(bufnr or 0)) do
    local code = d.code or (d.user_data and d.user_data.lsp and d.user_data.lsp.code)
    if d.source == 'hexray' then
      if code == 'no-trace' then state = 'no trace'
      elseif code == 'stale-trace' then state = 'stale'
      elseif code == 'trace-unreadable' then state = 'unreadable'
      elseif code == 'recording-failed' then state = 'record failed' end
    end
  end
  return 'HexRay: ' .. state
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  if vim.filetype and vim.filetype.add then
    vim.filetype.add({ extension = { prompt = M.filetype } })
  end
  local group = vim.api.nvim_create_augroup('hexray', { clear = true })
  -- Neovim 0.7 has no vim.filetype.add; and with `filetype off` nothing else would set it
  vim.api.nvim_create_autocmd({ 'BufRead', 'BufNewFile' }, {
    group = group, pattern = '*.prompt',
    callback = function(a)
      if vim.bo[a.buf].filetype ~= M.filetype then vim.bo[a.buf].filetype = M.filetype end
    end,
  })
  vim.api.nvim_create_autocmd('FileType', {
    group = group, pattern = M.filetype,
    callback = function(a) M.attach(a.buf) end,
  })
  local cmd = vim.api.nvim_create_user_command
  cmd('HexRayRecord', M.record, { desc = 'HexRay: record the trace of this prompt' })
  cmd('HexRayCancel', function() M.execute('hexray.cancelRecording', true) end, { desc = 'HexRay: cancel recording' })
  cmd('HexRayStatus', function() M.status() end, { desc = 'HexRay: trace state of this prompt' })
  cmd('HexRayRestartWorker', function() M.execute('hexray.restartWorker', false) end,
    { desc = 'HexRay: restart the record worker (reloads the model)' })
  cmd('HexRayRestart', function()
    for _, c in ipairs(M.clients(0)) do stop(c) end
    started = {}
    vim.defer_fn(function()
      for _, b in ipairs(vim.api.nvim_list_bufs()) do
        if vim.api.nvim_buf_is_loaded(b) and vim.bo[b].filetype == M.filetype then M.attach(b) end
      end
    end, 500)
  end, { desc = 'HexRay: restart the language server' })
  -- buffers opened before setup()
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_loaded(b) and vim.api.nvim_buf_get_name(b):match('%.prompt$') then
      vim.bo[b].filetype = M.filetype
    end
  end
end

return M
