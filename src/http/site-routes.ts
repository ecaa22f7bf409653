/**
 * The chat page (web/, plain ES modules, no build step), the libraries it imports served
 * from this server's own pinned dependencies (no CDN), and the Prometheus scrape.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { FastifyInstance, FastifyReply } from "fastify";
import { ApiError } from "../errors.js";

export interface MetricsScrape {
  enabled: boolean;
  scrape(): Promise<{ contentType: string; body: string }>;
}

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
};

/** The languages code blocks are highlighted in (highlight.js ships ~190; the page needs these). */
const HIGHLIGHT_LANGUAGES = ["bash", "c", "cpp", "css", "diff", "go", "java", "javascript", "json", "markdown", "python", "rust", "shell", "sql", "typescript", "xml", "yaml"];

/** A dependency's folder (its exports map may hide package.json: resolve the entry and climb). */
function packageDir(name: string): string {
  let dir = dirname(createRequire(import.meta.url).resolve(name));
  while (!existsSync(join(dir, "package.json")) || JSON.parse(readFileSync(join(dir, "package.json"), "utf8")).name !== name) {
    if (dirname(dir) === dir) throw new Error(`cannot find the package folder of ${name}`);
    dir = dirname(dir);
  }
  return dir;
}

/**
 * highlight.js publishes CommonJS only (its es/ files re-export lib/): its core and each
 * language are self-contained `module.exports = …` files, wrapped here into one ES module.
 */
function highlightModule(): string {
  const lib = join(packageDir("highlight.js"), "lib");
  const wrap = (file: string) => `(() => { const module = { exports: {} }; const exports = module.exports;\n${readFileSync(join(lib, file), "utf8")}\nreturn module.exports; })()`;
  return [
    `// highlight.js ${JSON.parse(readFileSync(join(lib, "..", "package.json"), "utf8")).version} (BSD-3-Clause): core and ${HIGHLIGHT_LANGUAGES.length} languages.`,
    `const hljs = ${wrap("core.js")};`,
    ...HIGHLIGHT_LANGUAGES.map((l) => `hljs.registerLanguage(${JSON.stringify(l)}, ${wrap(`languages/${l}.js`)});`),
    "export default hljs;",
  ].join("\n");
}

export function registerPage(app: FastifyInstance): void {
  const config = { area: "page" as const };
  const webRoot = fileURLToPath(new URL("../../web/", import.meta.url));
  const send = (body: Buffer | string, type: string, cache: string) => async (_req: unknown, reply: FastifyReply) =>
    reply.type(type).header("cache-control", cache).header("x-content-type-options", "nosniff").send(body);
  // The page's own files, read once: a fixed list, so no request path reaches the disk.
  for (const file of readdirSync(webRoot)) {
    const type = TYPES[file.slice(file.lastIndexOf("."))];
    if (!type) continue;
    const body = readFileSync(join(webRoot, file));
    app.get(file === "index.html" ? "/" : `/${file}`, { config }, send(body, type, "no-cache"));
  }
  // Browsers ask for /favicon.ico whatever the page links: the same icon.
  app.get("/favicon.ico", { config }, send(readFileSync(join(webRoot, "favicon.svg")), TYPES[".svg"]!, "public, max-age=86400"));
  // Pinned in package-lock.json; a new version is a new deploy, so a day of caching is safe.
  const vendor: Record<string, () => string | Buffer> = {
    "marked.js": () => readFileSync(join(packageDir("marked"), "lib", "marked.esm.js")),
    "purify.js": () => readFileSync(join(packageDir("dompurify"), "dist", "purify.es.mjs")),
    "highlight.js": highlightModule,
  };
  // Their source maps are not served: the comment would only make devtools ask for a 404.
  const stripMap = (code: string | Buffer) => String(code).replace(/^\/\/# sourceMappingURL=.*$/gm, "");
  for (const [file, load] of Object.entries(vendor)) app.get(`/vendor/${file}`, { config }, send(stripMap(load()), TYPES[".js"]!, "public, max-age=86400"));
}

export function registerMetrics(app: FastifyInstance, metrics: MetricsScrape): void {
  app.get("/metrics", { config: { area: "metrics" } }, async (_req, reply) => {
    if (!metrics.enabled) throw new ApiError("not_found", "Metrics are off (--metrics off).", { code: "metrics_off" });
    const { contentType, body } = await metrics.scrape();
    return reply.type(contentType).send(body);
  });
}
