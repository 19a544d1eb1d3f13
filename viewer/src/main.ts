// Boot: the page says where its data is (a server's API beside it, or JSON embedded in the page).

import { App } from "./app";
import { graphPage } from "./graph";
import { EmbeddedSource, ServerSource, type Embedded, type Source } from "./source";

function boot(): void {
  const root = document.getElementById("hexray-app");
  if (!root) return;
  const embedded = document.getElementById("hexray-data");
  const source: Source = embedded ? new EmbeddedSource(JSON.parse(embedded.textContent || "{}") as Embedded) : new ServerSource();
  start(root, source).then(() => { document.body.dataset.ready = "1"; }, (err) => {
    root.textContent = `HexRay viewer: ${String(err)}`;
    document.body.dataset.ready = "error";
  });
}

/** Graphs alone get the graph page; traces (with or without graphs) the app, which adds a graph tab. */
async function start(root: HTMLElement, source: Source): Promise<void> {
  const [traces, graphs] = await Promise.all([source.overview(), source.graphs ? source.graphs() : []]);
  if (!traces.length && graphs.length) return graphPage(root, graphs);
  if (!traces.length) throw new Error("nothing to show");
  return new App(root, source).start();
}

boot();
