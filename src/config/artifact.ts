import { createHash, type Hash } from "node:crypto";
import { createReadStream, createWriteStream, promises as fs } from "node:fs";
import { dirname } from "node:path";
import { pipeline } from "node:stream/promises";
import { Readable, Transform } from "node:stream";
import { SingleBar } from "cli-progress";

/** A model file that could not be made available (missing, corrupt, download failed). */
export class ArtifactError extends Error {
  /** A fetch that failed (network, server): trying again later may work. A hash mismatch never will. */
  constructor(message: string, readonly transient = false) {
    super(message);
    this.name = "ArtifactError";
  }
}

export interface ArtifactSpec {
  id: string;
  path: string;
  sha256: string | undefined;
  sources: string[];
}

export interface ArtifactOptions {
  /** Where progress goes; a progress bar when it is a terminal, a line per 10% otherwise. */
  progressStream?: NodeJS.WritableStream & { isTTY?: boolean };
  log?: (line: string) => void;
}

async function hashFile(path: string, hash: Hash = createHash("sha256")): Promise<Hash> {
  await pipeline(createReadStream(path), new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      done();
    },
  }));
  return hash;
}

/**
 * A source as logs may show it: no credentials (user:password@), no query or fragment
 * (presigned URLs carry their signature there). Local paths are kept as they are.
 */
export function redactSource(source: string): string {
  if (!/^https?:\/\//i.test(source)) return source;
  try {
    const u = new URL(source);
    const hidden = u.search !== "" || u.hash !== "" ? "?…" : "";
    return `${u.protocol}//${u.host}${u.pathname}${hidden}`;
  } catch {
    return "(an unparseable URL)";
  }
}

/** Any URL in a text, with its credentials and query redacted (error messages may quote the URL they failed on). */
function redactText(text: string): string {
  return text.replace(/https?:\/\/[^\s"'<>]+/gi, (url) => redactSource(url));
}

/** Why a fetch failed, with the cause Node hides behind "fetch failed" (ENOTFOUND host, ECONNREFUSED…); never a secret. */
function failure(err: unknown): string {
  const e = err as Error & { cause?: { code?: string; hostname?: string; message?: string } };
  const cause = e.cause;
  const text = cause && (cause.code || cause.message) ? `${e.message} (${[cause.code, cause.hostname].filter(Boolean).join(" ") || cause.message})` : e.message;
  return redactText(text);
}

/** A URL's credentials as a Basic authorization header (fetch refuses URLs that carry them), and the URL without them. */
function withoutCredentials(source: string): { url: string; headers: Record<string, string> } {
  const u = new URL(source);
  if (u.username === "" && u.password === "") return { url: source, headers: {} };
  const basic = Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString("base64");
  u.username = "";
  u.password = "";
  return { url: u.toString(), headers: { authorization: `Basic ${basic}` } };
}

/** path -> "dev:ino:size:mtime:sha256" of files this process has hashed and found as pinned. */
const verified = new Map<string, string>();

async function exists(path: string): Promise<boolean> {
  try {
    await fs.access(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Makes sure the model file is present and, when a sha256 is pinned, that it is the
 * pinned file. A missing file is fetched from its sources into `<file>.partial`,
 * hashed while it streams, and renamed into place only once the hash matches, so a
 * partial or corrupt file is never used. An interrupted HTTP download resumes.
 */
export async function ensureArtifact(spec: ArtifactSpec, opts: ArtifactOptions = {}): Promise<void> {
  const log = opts.log ?? (() => {});
  if (await exists(spec.path)) {
    if (spec.sha256 !== undefined) {
      // A version evicted and loaded again (LRU swaps) is not hashed again while the file
      // is the same file: hashing costs seconds per GB, on every cold swap.
      const stat = await fs.stat(spec.path);
      const identity = `${stat.dev}:${stat.ino}:${stat.size}:${stat.mtimeMs}`;
      if (verified.get(spec.path) === `${identity}:${spec.sha256}`) return;
      const actual = (await hashFile(spec.path)).digest("hex");
      if (actual !== spec.sha256) {
        throw new ArtifactError(`model "${spec.id}": sha256 mismatch for ${spec.path}: expected ${spec.sha256}, got ${actual}`);
      }
      verified.set(spec.path, `${identity}:${spec.sha256}`);
    }
    return;
  }
  if (spec.sources.length === 0) {
    throw new ArtifactError(`model "${spec.id}": file not found: ${spec.path} (and no sources to fetch it from)`);
  }
  await fs.mkdir(dirname(spec.path), { recursive: true });
  const failures: string[] = [];
  for (const source of spec.sources) {
    try {
      await fetchInto(spec, source, opts);
      log(`model "${spec.id}": ${isUrl(source) ? "fetched" : "copied"} ${spec.path} from ${redactSource(source)}`);
      return;
    } catch (err) {
      failures.push(`${redactSource(source)}: ${failure(err)}`);
    }
  }
  const sha = spec.sha256 ? ` (sha256 ${spec.sha256})` : "";
  throw new ArtifactError(
    `model "${spec.id}": could not fetch ${spec.path}: ${failures.join("; ")}. Put the file there${sha}, or fix its sources in the models file.`,
    true,
  );
}

const isUrl = (source: string) => /^https?:\/\//i.test(source);

async function fetchInto(spec: ArtifactSpec, source: string, opts: ArtifactOptions): Promise<void> {
  const partial = `${spec.path}.partial`;
  if (!isUrl(source)) {
    if (!(await exists(source))) throw new Error("not found");
    const total = (await fs.stat(source)).size;
    return finish(spec, partial, createReadStream(source), createHash("sha256"), 0, total, { ...opts, verb: "copying" });
  }
  const have = (await exists(partial)) ? (await fs.stat(partial)).size : 0;
  // A server that never answers must not hold the load forever; once it answers, the body streams at its own pace.
  const answered = new AbortController();
  const timer = setTimeout(() => answered.abort(new Error(`no answer within ${FETCH_CONNECT_TIMEOUT_MS / 1000} s`)), FETCH_CONNECT_TIMEOUT_MS);
  let res: Response;
  try {
    const { url, headers } = withoutCredentials(source);
    res = await fetch(url, { headers: { ...headers, ...(have > 0 ? { range: `bytes=${have}-` } : {}) }, redirect: "follow", signal: answered.signal });
  } finally {
    clearTimeout(timer);
  }
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  if (res.body === null) throw new Error("empty response body");
  const body = Readable.fromWeb(res.body as import("node:stream/web").ReadableStream<Uint8Array>);
  if (res.status === 206 && have > 0) {
    // Resume: the hash must cover the bytes already on disk too.
    const range = /\/(\d+)$/.exec(res.headers.get("content-range") ?? "");
    return finish(spec, partial, body, await hashFile(partial), have, range ? Number(range[1]) : undefined, opts);
  }
  // A fresh download, or a server that ignored the range: start over.
  const len = res.headers.get("content-length");
  return finish(spec, partial, body, createHash("sha256"), 0, len !== null ? Number(len) : undefined, opts);
}

/** How long a fetch may take to answer with its headers (the body then streams at its own pace). */
const FETCH_CONNECT_TIMEOUT_MS = 30_000;

async function finish(
  spec: ArtifactSpec,
  partial: string,
  body: Readable,
  hash: Hash,
  offset: number,
  total: number | undefined,
  opts: ArtifactOptions & { verb?: string },
): Promise<void> {
  const progress = makeProgress(spec.id, total, offset, opts, opts.verb ?? "downloading");
  let received = offset;
  const meter = new Transform({
    transform(chunk: Buffer, _enc, done) {
      hash.update(chunk);
      received += chunk.length;
      progress.update(received);
      done(null, chunk);
    },
  });
  try {
    await pipeline(body, meter, createWriteStream(partial, { flags: offset > 0 ? "a" : "w" }));
  } finally {
    progress.stop();
  }
  if (total !== undefined && received !== total) {
    throw new Error(`transfer incomplete: ${received} of ${total} bytes (kept ${partial} to resume)`);
  }
  const actual = hash.digest("hex");
  if (spec.sha256 !== undefined && actual !== spec.sha256) {
    await fs.rm(partial, { force: true });
    throw new Error(`sha256 mismatch: expected ${spec.sha256}, got ${actual}`);
  }
  // Same directory, so the rename is atomic: readers see no file or the whole file.
  await fs.rename(partial, spec.path);
}

interface Progress {
  update(bytes: number): void;
  stop(): void;
}

function makeProgress(id: string, total: number | undefined, start: number, opts: ArtifactOptions, verb: string): Progress {
  const out = opts.progressStream;
  if (out === undefined) return { update() {}, stop() {} };
  if (out.isTTY === true && total !== undefined) {
    const bar = new SingleBar({
      stream: out,
      format: `${verb} ${id} [{bar}] {percentage}% | {value}/{total} bytes | {eta}s`,
      hideCursor: true,
    });
    bar.start(total, start);
    return { update: (b) => bar.update(b), stop: () => bar.stop() };
  }
  // Not a terminal: one line per 10%, so logs show progress without a flood.
  let lastDecile = -1;
  return {
    update(bytes) {
      const decile = total ? Math.floor((bytes / total) * 10) : Math.floor(bytes / (64 << 20));
      if (decile !== lastDecile) {
        lastDecile = decile;
        out.write(`${verb} ${id}: ${bytes}${total ? `/${total} bytes (${decile * 10}%)` : " bytes"}\n`);
      }
    },
    stop() {},
  };
}
