/**
 * A real HTTP server that serves a model file the ways a network can: whole
 * (/good.gguf, any other path), corrupted (/corrupt.gguf), missing (/missing.gguf), cut
 * short once and then whole (/flaky.gguf), honouring Range requests for resumes.
 */
import { createServer } from "node:http";

export interface ModelHttp {
  base: string;
  /** Every request, in order. */
  hits: Array<{ path: string; range: string | undefined }>;
  close(): void;
}

export async function serveModel(bytes: Buffer): Promise<ModelHttp> {
  const hits: ModelHttp["hits"] = [];
  let cutOnce = true;
  const http = createServer((req, res) => {
    hits.push({ path: req.url!, range: req.headers.range });
    if (req.url === "/corrupt.gguf") {
      const bad = Buffer.from(bytes);
      bad[bad.length - 10] = bad[bad.length - 10]! ^ 0xff;
      res.writeHead(200, { "content-length": bad.length });
      res.end(bad);
      return;
    }
    if (req.url === "/missing.gguf") {
      res.writeHead(404).end();
      return;
    }
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
    if (range) {
      const start = Number(range[1]);
      res.writeHead(206, { "content-length": bytes.length - start, "content-range": `bytes ${start}-${bytes.length - 1}/${bytes.length}` });
      res.end(bytes.subarray(start));
      return;
    }
    res.writeHead(200, { "content-length": bytes.length });
    if (req.url === "/flaky.gguf" && cutOnce) {
      // Send 40% and drop the connection, as a failed network would.
      cutOnce = false;
      res.write(bytes.subarray(0, Math.floor(bytes.length * 0.4)), () => res.destroy());
      return;
    }
    res.end(bytes);
  });
  await new Promise<void>((r) => http.listen(0, "127.0.0.1", r));
  const addr = http.address();
  return { base: `http://127.0.0.1:${typeof addr === "object" && addr ? addr.port : 0}`, hits, close: () => http.close() };
}
