;;; hexray.el --- HexRay: per-token attribution in prompt files, through eglot  -*- lexical-binding: t; -*-

;; Author: The HexRay authors
;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1") (eglot "1.9"))
;; Keywords: languages, tools

;;; Commentary:

;; A major mode for *.prompt files and the eglot setup for the HexRay language server (`hexray lsp').
;;
;;   (add-to-list 'load-path "/path/to/hexray/editor/emacs")
;;   (require 'hexray)
;;   (setq hexray-server-command '("/path/to/venv/bin/python" "-m" "hexray" "lsp")) ; default: ("hexray" "lsp")
;;   (setq hexray-settings '(:model "gpt2" :device "cpu" :inlayHints "probability"
;;                          :hover (:predictions 5) :recordOptions (:top_k 20)))
;;   (add-hook 'hexray-prompt-mode-hook #'eglot-ensure)
;;
;; Hover a token and the echo area (or M-x eldoc-doc-buffer) shows the hover: the token's probability,
;; rank, surprisal, the top predictions and the components that contributed to it.  Flymake shows the
;; diagnostics (no trace, stale trace, ...).  Inlay hints need eglot 1.12+ (Emacs 29): `eglot-inlay-hints-mode'.
;;
;; Commands (in `hexray-prompt-mode-map'):
;;   C-c C-r  `hexray-record-trace'      record the trace of this prompt (in the server's worker)
;;   C-c C-k  `hexray-cancel-recording'
;;   C-c C-s  `hexray-status'            trace state: fresh, stale, none, ...
;;   M-x `hexray-restart-worker'         reload the model in the worker
;;
;; `hexray-settings' are the server's settings (hexray_lsp/settings.py, camelCase), sent as
;; initializationOptions.  Per project, set them in .dir-locals.el instead:
;;   ((hexray-prompt-mode . ((eglot-workspace-configuration . (:hexray (:model "gpt2"))))))

;;; Code:

(require 'eglot)
(require 'jsonrpc)

(defgroup hexray nil
  "HexRay: per-token attribution for prompt files."
  :group 'tools
  :prefix "hexray-")

(defcustom hexray-server-command '("hexray" "lsp")
  "Command that starts the HexRay language server: program and arguments.
For a virtual environment, e.g.
  (\"/path/venv/bin/python\" \"-m\" \"hexray_core\" \"lsp\")."
  :type '(repeat string))

(defcustom hexray-settings nil
  "HexRay server settings, a plist.
For example (:model \"gpt2\" :device \"cpu\" :inlayHints \"surprisal\"
:hover (:predictions 8)).  See hexray_lsp/settings.py for the names
and defaults."
  :type 'plist)

(defconst hexray--font-lock
  `((,(rx "<|im_start|>" (group (+ (any alnum "_-")))) 1 font-lock-function-name-face)
    (,(rx "<" (any "|｜") (** 1 80 (not (any "|｜<> \t\n"))) (any "|｜") ">") . font-lock-keyword-face)
    (,(rx (or "<s>" "</s>" "[INST]" "[/INST]" "<<SYS>>" "<</SYS>>")) . font-lock-keyword-face)
    (,(rx "<" (? "/") (or "think" "thinking" "reasoning" "scratchpad" "answer") ">") . font-lock-type-face)
    (,(rx "{{" (* space) (not (any "{}" space)) (*? (not (any "{}"))) (* space) "}}") . font-lock-variable-name-face)
    (,(rx "{%" (*? nonl) "%}") . font-lock-preprocessor-face))
  "Special tokens, chat-template markers, reasoning tags and template placeholders.")

(defvar hexray-prompt-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-c C-r") #'hexray-record-trace)
    (define-key map (kbd "C-c C-k") #'hexray-cancel-recording)
    (define-key map (kbd "C-c C-s") #'hexray-status)
    map)
  "Keymap for `hexray-prompt-mode'.")

;;;###autoload
(define-derived-mode hexray-prompt-mode text-mode "HexRay-Prompt"
  "Major mode for prompt files, recorded and explained by HexRay.
The whole file is the prompt, exactly as written: nothing is a comment."
  (setq-local font-lock-defaults '(hexray--font-lock t))
  (setq-local require-final-newline nil)) ; a final newline would be a token of the prompt

;;;###autoload
(add-to-list 'auto-mode-alist '("\\.prompt\\'" . hexray-prompt-mode))

(put 'hexray-prompt-mode 'eglot-language-id "hexray-prompt")

(defun hexray--settings-json ()
  "The settings sent as initializationOptions (an empty object when unset)."
  (or hexray-settings (make-hash-table)))

(defun hexray--contact (&optional _interactive)
  "The eglot contact: `hexray-server-command', `hexray-settings'.
The settings go to the server as initializationOptions."
  (append hexray-server-command (list :initializationOptions (hexray--settings-json))))

(add-to-list 'eglot-server-programs '(hexray-prompt-mode . hexray--contact))

;;; Commands

(defun hexray--uri ()
  (plist-get (eglot--TextDocumentIdentifier) :uri))

(defun hexray--execute (command with-uri callback)
  "Run the server COMMAND and call CALLBACK with its result.
With WITH-URI, the command's argument is this buffer's URI."
  (let ((server (eglot--current-server-or-lose)))
    (jsonrpc-async-request
     server :workspace/executeCommand
     (list :command command :arguments (if with-uri (vector (hexray--uri)) []))
     :success-fn callback
     :error-fn (lambda (err) (message "HexRay: %s failed: %s" command (plist-get err :message)))
     :timeout 3600)))

(defun hexray-record-trace ()
  "Record the trace of this prompt in the server's worker.
The model is the :model of `hexray-settings' (default hexray-demo)."
  (interactive)
  (message "HexRay: recording…")
  (hexray--execute
   "hexray.recordTrace" t
   (lambda (res)
     (if (equal (plist-get res :status) "recorded")
         (message "HexRay: recorded %s tokens in %.1f s -> %s" (plist-get res :tokens)
                  (or (plist-get res :seconds) 0) (plist-get res :path))
       (message "HexRay: %s %s" (plist-get res :status) (or (plist-get res :message) ""))))))

(defun hexray-cancel-recording ()
  "Cancel the recording of this prompt."
  (interactive)
  (hexray--execute "hexray.cancelRecording" t #'ignore))

(defun hexray-restart-worker ()
  "Stop the record worker.
The next recording starts a fresh one and loads the model again."
  (interactive)
  (hexray--execute "hexray.restartWorker" nil (lambda (_) (message "HexRay: worker restarted"))))

(defun hexray-status (&optional callback)
  "Show the state of this prompt's trace.
The state is fresh, stale, none, error, loading or recording.  With
CALLBACK, call it with the state (a string) and the server's whole
answer instead."
  (interactive)
  (let ((uri (hexray--uri)))
    (hexray--execute
     "hexray.status" nil
     (lambda (res)
       (let* ((docs (plist-get res :documents))
              (doc (and docs (plist-get docs (intern (concat ":" uri)))))
              (state (cond ((null doc) "unknown")
                           ((eq (plist-get doc :recording) t) "recording")
                           (t (plist-get doc :state)))))
         (if callback
             (funcall callback state res)
           (message "HexRay: trace %s%s (model %s)" state
                    (if (and doc (stringp (plist-get doc :trace))) (concat " · " (plist-get doc :trace)) "")
                    (plist-get (plist-get res :settings) :model))))))))

(provide 'hexray)
;;; hexray.el ends here
