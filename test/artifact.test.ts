import { existsSync, mkdtempSync, readFileSync, renameSync, statSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Writable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ArtifactError, ensureArtifact } from "../src/config/artifact.js";
import { parseModelsFile } from "../src/config/models-file.js";
import { startServer } from "../src/server.js";
import { serveModel, type ModelHttp } from "./helpers/model-http.js";
import { openaiClient, sharedModel, testServerOptions } from "./helpers/server.js";

const STORIES_SHA = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";
const bytes = readFileSync(sharedModel("stories260K.gguf"));

let http: ModelHttp;
let base: string;
let hits: ModelHttp["hits"];

beforeAll(async () => {
  http = await serveModel(bytes);
  ({ base, hits } = http);
});
afterAll(() => http?.close());

const tmp = () => mkdtempSync(join(tmpdir(), "spindle-artifact-"));
const sink = () => {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk, _e, cb) {
      lines.push(String(chunk));
      cb();
    },
  });
  return { stream, lines };
};

describe("model artifacts", () => {
  it("downloads a missing file with progress, checks its hash, moves it into place", async () => {
    const dir = tmp();
    const path = join(dir, "models", "stories.gguf");
    const progress = sink();
    await ensureArtifact({ id: "s", path, sha256: STORIES_SHA, sources: [`${base}/good.gguf`] }, { progressStream: progress.stream });
    expect(readFileSync(path).equals(bytes)).toBe(true);
    expect(existsSync(`${path}.partial`)).toBe(false);
    expect(progress.lines.some((l) => l.includes("100%"))).toBe(true);
  });

  it("a hash mismatch is a clear error and leaves no file, partial or whole", async () => {
    const dir = tmp();
    const path = join(dir, "stories.gguf");
    const err = await ensureArtifact({ id: "s", path, sha256: STORIES_SHA, sources: [`${base}/corrupt.gguf`] }).catch((e) => e);
    expect(err).toBeInstanceOf(ArtifactError);
    expect(err.message).toMatch(/sha256 mismatch/);
    expect(existsSync(path)).toBe(false);
    expect(existsSync(`${path}.partial`)).toBe(false);
  });

  it("a failed download is a clear error; the next source is tried", async () => {
    const dir = tmp();
    const path = join(dir, "stories.gguf");
    const err = await ensureArtifact({ id: "s", path, sha256: STORIES_SHA, sources: [`${base}/missing.gguf`] }).catch((e) => e);
    expect(err.message).toMatch(/HTTP 404/);
    await ensureArtifact({ id: "s", path, sha256: STORIES_SHA, sources: [`${base}/missing.gguf`, `${base}/good.gguf`] });
    expect(statSync(path).size).toBe(bytes.length);
  });

  it("an interrupted transfer is never used, and the next start resumes it with a Range request", async () => {
    const dir = tmp();
    const path = join(dir, "stories.gguf");
    const spec = { id: "s", path, sha256: STORIES_SHA, sources: [`${base}/flaky.gguf`] };
    await expect(ensureArtifact(spec)).rejects.toThrow();
    expect(existsSync(path)).toBe(false);
    const kept = statSync(`${path}.partial`).size;
    expect(kept).toBeGreaterThan(0);
    expect(kept).toBeLessThan(bytes.length);
    hits.length = 0;
    await ensureArtifact(spec);
    expect(hits[0]!.range).toBe(`bytes=${kept}-`);
    expect(readFileSync(path).equals(bytes)).toBe(true);
  });

  it("an existing file with the wrong hash is refused, not used", async () => {
    const dir = tmp();
    const path = join(dir, "stories.gguf");
    writeFileSync(path, "not a model");
    await expect(ensureArtifact({ id: "s", path, sha256: STORIES_SHA, sources: [] })).rejects.toThrow(/sha256 mismatch/);
  });

  it("a file already verified is not hashed again on the next load, but a changed file is", async () => {
    const dir = tmp();
    const path = join(dir, "stories.gguf");
    writeFileSync(path, bytes);
    const spec = { id: "s", path, sha256: STORIES_SHA, sources: [] };
    const when = 1_700_000_000;
    utimesSync(path, when, when);
    await ensureArtifact(spec);
    // Proof that it was not read again: the same inode, size and mtime is trusted
    // (bytes changed behind its back, timestamps put back, pass unnoticed in this process).
    const tampered = Buffer.from(bytes);
    tampered[200] = tampered[200]! ^ 0xff;
    writeFileSync(path, tampered);
    utimesSync(path, when, when);
    await ensureArtifact(spec);
    writeFileSync(path, bytes);
    // Replaced (a new file renamed over it), or rewritten in place later: checked again.
    const bad = Buffer.from(bytes);
    bad[100] = bad[100]! ^ 0xff;
    writeFileSync(`${path}.new`, bad);
    renameSync(`${path}.new`, path);
    await expect(ensureArtifact(spec)).rejects.toThrow(/sha256 mismatch/);
    writeFileSync(path, bytes);
    await ensureArtifact(spec);
    await new Promise((r) => setTimeout(r, 20));
    writeFileSync(path, bad);
    await expect(ensureArtifact(spec)).rejects.toThrow(/sha256 mismatch/);
  });

  it("the server starts from a models file whose model must be downloaded, and serves it", async () => {
    const dir = tmp();
    const file = join(dir, "models.yaml");
    writeFileSync(
      file,
      `models:\n  - id: dl\n    file: cache/stories.gguf\n    sha256: ${STORIES_SHA}\n    sources: ["${base}/good.gguf"]\n    chat_template: general\n    ctx_size: 256\n    parallel: 2\n`,
    );
    const specs = parseModelsFile(readFileSync(file, "utf8"), file);
    expect(specs.models[0]!.versions[0]!.version).toBe(STORIES_SHA.slice(0, 12));
    expect(specs.models[0]!.versions[0]!.path).toBe(join(dir, "cache/stories.gguf"));
    const server = await startServer(testServerOptions({ threads: 1 }), specs);
    try {
      const res = await openaiClient(server).completions.create({ model: "dl", prompt: "Once upon a time", max_tokens: 4, temperature: 0 });
      expect(res.choices[0]!.text.length).toBeGreaterThan(0);
      expect(existsSync(join(dir, "cache/stories.gguf"))).toBe(true);
    } finally {
      await server.close();
    }
  });
});

describe("models.yaml validation", () => {
  it.each([
    ["models: []", /models/],
    ["models:\n  - id: a\n", /model "a", field file/],
    ["models:\n  - id: a\n    file: a.gguf\n    ctx_size: -5\n", /model "a", field ctx_size/],
    ["models:\n  - id: a\n    file: a.gguf\n    sha256: xyz\n", /model "a", field sha256/],
    ["models:\n  - id: a\n    file: a.gguf\n    colour: red\n", /model "a".*colour/],
    ["models:\n  - id: a\n    file: a.gguf\n  - id: a\n    file: b.gguf\n", /duplicate id/],
    ["{{{", /not valid YAML/],
    // The versioned shape.
    ["models:\n  - id: a\n    versions:\n      - name: v1\n        file: a.gguf\n", /model "a", field versions.0.sha256/],
    [`models:\n  - id: a\n    default_version: v9\n    versions:\n      - { name: v1, file: a.gguf, sha256: ${"a".repeat(64)} }\n`, /model "a", field default_version: no version named "v9"/],
    [`models:\n  - id: a\n    canary: { version: v2, weight: 0.1 }\n    versions:\n      - { name: v1, file: a.gguf, sha256: ${"a".repeat(64)} }\n`, /field canary.version: no version named "v2"/],
    [`models:\n  - id: a\n    versions:\n      - { name: v1, file: a.gguf, sha256: ${"a".repeat(64)} }\n      - { name: v1, file: b.gguf, sha256: ${"b".repeat(64)} }\n`, /version "v1" listed twice/],
    [`models:\n  - id: a\n    versions:\n      - { name: v1, file: a.gguf, sha256: ${"a".repeat(64)} }\naliases:\n  b: a@v2\n`, /alias "b": target "a@v2"/],
    [`models:\n  - id: a\n    versions:\n      - { name: "v@1", file: a.gguf, sha256: ${"a".repeat(64)} }\n`, /field versions.0.name/],
  ])("%j is refused naming the problem", (text, message) => {
    expect(() => parseModelsFile(text, "/x/models.yaml")).toThrow(message);
  });

  it("the repository's own models.yaml is valid and names its default version", () => {
    const file = resolve(import.meta.dirname, "../models.yaml");
    const config = parseModelsFile(readFileSync(file, "utf8"), file);
    expect(config.models[0]).toMatchObject({ id: "stories260K", defaultVersion: "v1", pinned: false });
    expect(config.models[0]!.versions[0]).toMatchObject({ version: "v1", sha256: STORIES_SHA, ctxSize: 512, parallel: 8 });
  });

  it("resolves paths against the models file; a bare template name stays a built-in", () => {
    const [m] = parseModelsFile("models:\n  - id: a\n    file: sub/a.gguf\n    chat_template: chatML\n    sources: [../x.gguf, 'https://h/x.gguf']\n", "/srv/conf/models.yaml").models[0]!.versions;
    expect(m).toMatchObject({ path: "/srv/conf/sub/a.gguf", chatTemplate: "chatML", sources: ["/srv/x.gguf", "https://h/x.gguf"] });
  });
});
