-- Headless check that Neovim, configured with lua/hexray (this folder), shows HexRay's hover for a prompt
-- with a recorded trace beside it. Prints what it sees; exits 0 on success, 1 (and "FAIL ...") otherwise.
--
--   HEXRAY_CMD='["/path/venv/bin/python","-m","hexray","lsp"]' \
--   HEXRAY_FILE=/tmp/w/sample.prompt HEXRAY_NEEDLE=sat HEXRAY_EXPECT='["Top contributors"]' \
--     nvim --headless -u NONE -i NONE -n -c 'luafile editor/neovim/check_hover.lua'
--
-- Steps: the real `require('hexray').setup()`, open the file (filetype detection attaches the client), hover
-- request at the needle, the float that the real hover handler (`K`) opens, inlay hints for the whole buffer,
-- :HexRayStatus's request (trace "fresh"), then an edit and the "stale-trace" diagnostic.

local T0 = vim.loop.hrtime()
local out = function(...)
  io.stdout:write(string.format('[%5d ms] ', (vim.loop.hrtime() - T0) / 1e6) .. table.concat({ ... }, ' ') .. '\n')
end
local function fail(msg)
  out('FAIL ' .. msg)
  io.stdout:flush()
  vim.cmd('cquit')
end
local function json(v) return vim.fn.json_encode(v) end

local ok, err = pcall(function()
  local here = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h')
  vim.opt.runtimepath:prepend(here)
  local cmd = vim.fn.json_decode(os.getenv('HEXRAY_CMD') or '["hexray","lsp"]')
  local file = assert(os.getenv('HEXRAY_FILE'), 'HEXRAY_FILE is not set')
  local needle = os.getenv('HEXRAY_NEEDLE') or 'the'
  local expect = vim.fn.json_decode(os.getenv('HEXRAY_EXPECT') or '[]')
  local settings = vim.fn.json_decode(os.getenv('HEXRAY_SETTINGS') or '{}')
  local timeout = tonumber(os.getenv('HEXRAY_TIMEOUT_MS') or '30000')

  out('VERSION', json(vim.version()))
  vim.cmd('filetype on')
  local hexray = require('hexray')
  hexray.setup({ cmd = cmd, settings = settings })
  vim.cmd('edit ' .. vim.fn.fnameescape(file))
  local buf = vim.api.nvim_get_current_buf()
  out('FILETYPE', vim.bo[buf].filetype)
  if vim.bo[buf].filetype ~= 'hexray-prompt' then return fail('filetype is not hexray-prompt') end

  local client
  vim.wait(timeout, function()
    client = hexray.clients(buf)[1]
    return client ~= nil and client.server_capabilities ~= nil and client.server_capabilities.hoverProvider ~= nil
  end, 20)
  if not client or not client.server_capabilities then return fail('server did not initialize') end
  out('ENCODING', json(client.offset_encoding))

  -- cursor on the needle (byte column), then the position in the negotiated encoding
  local lnum, col
  for i, line in ipairs(vim.api.nvim_buf_get_lines(buf, 0, -1, false)) do
    local s = line:find(needle, 1, true)
    if s then lnum, col = i, s - 1; break end
  end
  if not lnum then return fail('needle not found: ' .. needle) end
  vim.api.nvim_win_set_cursor(0, { lnum, col })
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  out('POSITION', json(params.position))

  local t0 = vim.loop.hrtime()
  local res = vim.lsp.buf_request_sync(buf, 'textDocument/hover', params, timeout)
  local ms = (vim.loop.hrtime() - t0) / 1e6
  local hover
  for _, r in pairs(res or {}) do if r.result then hover = r.result end end
  if not hover then return fail('no hover: ' .. json(res or {})) end
  out('HOVER', json(hover))
  out('HOVER_MS', string.format('%.1f', ms))
  local value = type(hover.contents) == 'table' and (hover.contents.value or '') or tostring(hover.contents)
  for _, e in ipairs(expect) do
    if not value:find(e, 1, true) then return fail('hover lacks ' .. json(e)) end
  end

  -- the real hover handler: the floating window a user sees after `K`
  vim.lsp.buf.hover()
  local float_lines
  vim.wait(timeout, function()
    for _, win in ipairs(vim.api.nvim_list_wins()) do
      if vim.api.nvim_win_get_config(win).relative ~= '' then
        float_lines = vim.api.nvim_buf_get_lines(vim.api.nvim_win_get_buf(win), 0, -1, false)
        return #float_lines > 0
      end
    end
    return false
  end, 20)
  if not float_lines then return fail('no hover float opened') end
  out('FLOAT', json(float_lines))
  local shown = table.concat(float_lines, '\n')
  for _, e in ipairs(expect) do
    if not shown:find(e, 1, true) then return fail('hover float lacks ' .. json(e)) end
  end

  -- source highlights: the module's CursorHold autocmd asks for textDocument/documentHighlight
  local autocmds = vim.api.nvim_get_autocmds({ event = 'CursorHold', buffer = buf })
  out('HIGHLIGHT_AUTOCMDS', #autocmds)
  vim.api.nvim_win_set_cursor(0, { lnum, col })
  vim.api.nvim_exec_autocmds('CursorHold', { buffer = buf })
  local marks = 0
  vim.wait(timeout, function()
    for name, ns in pairs(vim.api.nvim_get_namespaces()) do
      if name:find('references', 1, true) then
        marks = #vim.api.nvim_buf_get_extmarks(buf, ns, 0, -1, {})
      end
    end
    return marks > 0
  end, 20)
  out('HIGHLIGHT_MARKS', marks)

  local last = vim.api.nvim_buf_line_count(buf)
  local hints = vim.lsp.buf_request_sync(buf, 'textDocument/inlayHint', {
    textDocument = { uri = vim.uri_from_bufnr(buf) },
    range = { start = { line = 0, character = 0 }, ['end'] = { line = last, character = 0 } },
  }, timeout)
  local count = 0
  for _, r in pairs(hints or {}) do count = count + #(r.result or {}) end
  out('INLAY_COUNT', count)
  if count == 0 then return fail('no inlay hints') end
  if vim.lsp.inlay_hint and vim.lsp.inlay_hint.is_enabled then
    out('INLAY_ENABLED', json(vim.lsp.inlay_hint.is_enabled({ bufnr = buf })))
  end

  local state
  hexray.status(function(s) state = s end)
  vim.wait(timeout, function() return state ~= nil end, 20)
  out('STATUS', json(state))
  if state ~= 'fresh' then return fail('trace state is ' .. tostring(state) .. ', expected fresh') end

  -- an edit makes the trace stale: a diagnostic, and the statusline says so
  vim.api.nvim_buf_set_lines(buf, -1, -1, false, { 'one more line' })
  local codes
  vim.wait(timeout, function()
    codes = {}
    for _, d in ipairs(vim.diagnostic.get(buf)) do
      codes[#codes + 1] = d.code or (d.user_data and d.user_data.lsp and d.user_data.lsp.code)
    end
    return vim.tbl_contains(codes, 'stale-trace')
  end, 20)
  out('DIAGNOSTICS', json(codes))
  if not vim.tbl_contains(codes, 'stale-trace') then return fail('no stale-trace diagnostic after an edit') end
  out('STATUSLINE', hexray.statusline(buf))
  if hexray.statusline(buf) ~= 'HexRay: stale' then return fail('statusline: ' .. hexray.statusline(buf)) end

  vim.lsp.stop_client(client.id)
  vim.wait(3000, function() return vim.lsp.client_is_stopped(client.id) end, 20)
  out('OK')
end)

if not ok then fail(tostring(err)) end
io.stdout:flush()
vim.cmd('qall!')
