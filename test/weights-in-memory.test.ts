/**
 * Weights read into memory instead of mapped (`--no-mmap`, the models file's `mmap: false`),
 * through the real engine and server: a mapped version's file shows in the process's memory
 * map, one read into memory does not, and both generate the same greedy text. Each server
 * loads its own copy of the file, so the map tells them apart; the per-version one comes
 * from a models file.
 */
import { copyFileSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseModelsFile } from "../src/config/models-file.js";
import { startServer, type RunningServer } from "../src/server.js";
import { sharedModel, startTestServer, STORIES, STORIES_GREEDY_PREFIX, testServerOptions } from "./helpers/server.js";

const dir = mkdtempSync(join(tmpdir(), "spindle-mmap-"));
const copy = (name: string) => {
  const f = join(dir, name);
  copyFileSync(sharedModel(STORIES.file), f);
  return f;
};
const servers: RunningServer[] = [];
let files: { mapped: string; perVersion: string; everyVersion: string };

beforeAll(() => {
  files = { mapped: copy("mapped.gguf"), perVersion: copy("per-version.gguf"), everyVersion: copy("every-version.gguf") };
});
afterAll(async () => {
  await Promise.all(servers.map((s) => s.close()));
});

const mappedFiles = () => readFileSync("/proc/self/maps", "utf8");

async function greedy(s: RunningServer): Promise<string> {
  const r = await fetch(`${s.url}/v1/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ model: STORIES.id, prompt: "Once upon a time", max_tokens: 20, temperature: 0 }),
  });
  expect(r.status).toBe(200);
  return ((await r.json()) as { choices: Array<{ text: string }> }).choices[0]!.text;
}

describe.runIf(process.platform === "linux")("weights in memory", () => {
  it("a mapped version's file is in the memory map; one with mmap: false or under --no-mmap is not, and all three generate the same greedy text", async () => {
    const mapped = await startTestServer([{ ...STORIES, file: files.mapped }]);
    const modelsFile = join(dir, "models.yaml");
    writeFileSync(modelsFile, `models:\n  - id: ${STORIES.id}\n    file: per-version.gguf\n    chat_template: general\n    ctx_size: 512\n    mmap: false\n`);
    const perVersion = await startServer(testServerOptions(), parseModelsFile(readFileSync(modelsFile, "utf8"), modelsFile));
    const everyVersion = await startTestServer([{ ...STORIES, file: files.everyVersion }], { noMmap: true });
    servers.push(mapped, perVersion, everyVersion);
    const maps = mappedFiles();
    expect(maps).toContain(files.mapped);
    expect(maps).not.toContain(files.perVersion);
    expect(maps).not.toContain(files.everyVersion);
    const texts = await Promise.all([mapped, perVersion, everyVersion].map(greedy));
    expect(texts[0]!.startsWith(STORIES_GREEDY_PREFIX.slice(0, 40))).toBe(true);
    expect(texts[1]).toBe(texts[0]);
    expect(texts[2]).toBe(texts[0]);
  });
});
