// Boot: the page says where its data is (a server's API beside it, or JSON embedded in the page).

import { App } from "./app";
import { EmbeddedSource, ServerSource, type Embedded, type Source } from "./source";

function boot(): void {
  const root = document.getElementById("hexray-app");
  if (!root) return;
  const embedded = document.getElementById("hexray-data");
  const source: Source = embedded ? new EmbeddedSource(JSON.parse(embedded.textContent || "{}") as Embedded) : new ServerSource();
  const app = new App(root, source);
  app.start().then(() => { document.body.dataset.ready = "1"; }, (err) => {
    root.textContent = `HexRay viewer: ${String(err)}`;
    document.body.dataset.ready = "error";
  });
}

boot();
