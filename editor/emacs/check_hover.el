;;; check_hover.el --- headless check: eglot + hexray.el show HexRay's hover  -*- lexical-binding: t; -*-

;; HEXRAY_CMD='["/path/venv/bin/python","-m","hexray","lsp"]' \
;; HEXRAY_FILE=/tmp/w/sample.prompt HEXRAY_NEEDLE=sat HEXRAY_EXPECT='["Top contributors"]' \
;;   emacs --batch -Q -l editor/emacs/check_hover.el
;;
;; Loads hexray.el (this folder), opens the prompt (auto-mode-alist -> hexray-prompt-mode), starts eglot with
;; the contact hexray.el registers, then: the hover request at the needle, the text eglot's own hover
;; function renders for eldoc, `hexray-status' (trace "fresh"), an edit and the stale-trace diagnostic in
;; Flymake.  Prints what it sees; exits 0 with "OK", or 1 with "FAIL ...".

;;; Code:

(defvar hexray-check--t0 (float-time))

(defun hexray-check--out (fmt &rest args)
  (princ (format "[%5d ms] %s\n" (round (* 1000 (- (float-time) hexray-check--t0))) (apply #'format fmt args))))

(defun hexray-check--fail (fmt &rest args)
  (hexray-check--out "FAIL %s" (apply #'format fmt args))
  (kill-emacs 1))

(defun hexray-check--wait (what pred timeout)
  "Process events until PRED is non-nil, or fail after TIMEOUT seconds waiting for WHAT."
  (let ((deadline (+ (float-time) timeout)) v)
    (while (and (not (setq v (funcall pred))) (< (float-time) deadline))
      (accept-process-output nil 0.05))
    (or v (hexray-check--fail "timed out waiting for %s" what))))

;; Emacs 28 with Debian's elpa-eglot: -Q skips package.el, so put eglot and its dependencies on the path
;; (Emacs 29+ has eglot built in).
(unless (locate-library "eglot")
  (dolist (dir (file-expand-wildcards "/usr/share/emacs/site-lisp/elpa-src/*"))
    (add-to-list 'load-path dir)))

(add-to-list 'load-path (file-name-directory (or load-file-name buffer-file-name)))

(condition-case err
    (let* ((cmd (json-parse-string (or (getenv "HEXRAY_CMD") "[\"hexray\",\"lsp\"]") :array-type 'list))
           (file (or (getenv "HEXRAY_FILE") (error "HEXRAY_FILE is not set")))
           (needle (or (getenv "HEXRAY_NEEDLE") "the"))
           (expect (json-parse-string (or (getenv "HEXRAY_EXPECT") "[]") :array-type 'list))
           (timeout (/ (string-to-number (or (getenv "HEXRAY_TIMEOUT_MS") "30000")) 1000.0))
           (settings (getenv "HEXRAY_SETTINGS")))
      (require 'hexray)
      (hexray-check--out "VERSION emacs %s, eglot from %s" emacs-version (locate-library "eglot"))
      (setq hexray-server-command cmd)
      (when settings
        (setq hexray-settings (json-parse-string settings :object-type 'plist)))
      (setq eglot-sync-connect timeout)
      ;; a plain folder is not a project for project.el: make it one
      (add-hook 'project-find-functions (lambda (dir) (cons 'transient dir)))
      (find-file file)
      (hexray-check--out "MODE %s" major-mode)
      (unless (eq major-mode 'hexray-prompt-mode) (hexray-check--fail "major mode is %s" major-mode))
      ;; eglot-ensure waits for a command loop that batch mode never runs: start it directly
      (apply #'eglot (eglot--guess-contact))
      (hexray-check--wait "the server" (lambda () (and (eglot-current-server) (eglot-managed-p))) timeout)
      (hexray-check--out "LANGUAGE-ID %s" (if (fboundp 'eglot--language-ids) ; eglot 1.16+
                                              (car (eglot--language-ids (eglot-current-server)))
                                            (eglot--language-id (eglot-current-server))))

      (goto-char (point-min))
      (unless (search-forward needle nil t) (hexray-check--fail "needle not found: %s" needle))
      (goto-char (match-beginning 0))
      (let* ((params (eglot--TextDocumentPositionParams))
             (t0 (float-time))
             (hover (jsonrpc-request (eglot-current-server) :textDocument/hover params :timeout timeout))
             (value (plist-get (plist-get hover :contents) :value)))
        (hexray-check--out "POSITION %s" (json-encode (plist-get params :position)))
        (hexray-check--out "HOVER_MS %.1f" (* 1000 (- (float-time) t0)))
        (hexray-check--out "HOVER %s" (json-encode hover))
        (dolist (e expect)
          (unless (and value (string-search e value)) (hexray-check--fail "hover lacks %S" e))))

      ;; what the user sees: eglot's hover function for eldoc, rendered
      (let (rendered)
        (eglot-hover-eldoc-function (lambda (info &rest _) (setq rendered (or info ""))))
        (hexray-check--wait "the rendered hover" (lambda () rendered) timeout)
        (hexray-check--out "RENDERED %s" (json-encode (split-string (substring-no-properties rendered) "\n")))
        (dolist (e expect)
          (unless (string-search e rendered) (hexray-check--fail "rendered hover lacks %S" e))))

      (let (state)
        (hexray-status (lambda (s _res) (setq state s)))
        (hexray-check--wait "hexray-status" (lambda () state) timeout)
        (hexray-check--out "STATUS %s" state)
        (unless (equal state "fresh") (hexray-check--fail "trace state is %s, expected fresh" state)))

      ;; an edit makes the trace stale: Flymake gets the server's stale-trace diagnostic
      (goto-char (point-max))
      (insert "one more line\n")
      (eglot--signal-textDocument/didChange)
      (let (diags)
        (hexray-check--wait
         "the stale-trace diagnostic"
         (lambda ()
           (flymake-start)
           (setq diags (mapcar #'flymake-diagnostic-text (flymake-diagnostics)))
           (cl-some (lambda (d) (string-search "[stale-trace]" d)) diags))
         timeout)
        (hexray-check--out "DIAGNOSTICS %s" (json-encode diags)))

      (set-buffer-modified-p nil)
      (eglot-shutdown (eglot-current-server))
      (hexray-check--out "OK")
      (kill-emacs 0))
  (error (hexray-check--fail "%s" (error-message-string err))))

;;; check_hover.el ends here
