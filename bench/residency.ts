/**
 * npm run bench -- residency
 *
 * What the model repository costs and whether its memory arithmetic holds, measured on
 * the real server (a child process) through its HTTP API:
 *
 *  1. Estimated vs allocated memory for each shared model at several context shapes
 *     (versions of one id differ only in ctx_size x parallel): the estimate is made from
 *     the GGUF header before loading; "allocated" is llama.cpp's own memory breakdown
 *     after the load; the RSS delta of the process is shown beside it.
 *  2. Load, warm-up and time to ready of each shared model.
 *  3. With a budget that fits one of two models: a warm request (model resident) against
 *     a cold swap (evict the other, load, warm up, answer), medians of N each.
 *  4. Three models under a budget that fits only some at once, a request sequence that
 *     mixes them: every request must succeed, and the evictions must equal what an LRU
 *     simulation over the estimates predicts.
 */
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT, startSpindleWith, type ServerProcess } from "./lib/processes.js";
import { scrapeMetrics } from "./lib/server-metrics.js";

const SHARED = join(ROOT, "..", "shared", "models");
const MODELS = [
  { id: "stories260K", file: "stories260K.gguf", sha: "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d" },
  { id: "stories260K-chat", file: "stories260K-chat.gguf", sha: "98234cb2bfd666ea2460cb4418428b56f59313b5610130f3d43fd92b487b7da0" },
  { id: "llama-2-tiny-random", file: "llama-2-tiny-random.gguf", sha: "81f226c62d28ed4a1a9b9fa080fcd9f0cc40e0f9d5680036583ff98fbcd035cb" },
  { id: "llama-2-tiny-random-chat", file: "llama-2-tiny-random-chat.gguf", sha: "3b6cde72ac219e6c91808500d0c940615ed33316c36ae7a924d351cc7ab6dc52" },
];
const SHAPES = [
  { ctx: 256, parallel: 1 },
  { ctx: 512, parallel: 4 },
  { ctx: 2048, parallel: 8 },
];
/** The shape phases 2–4 use. */
const DEFAULT_SHAPE = SHAPES[1]!;

interface VersionView {
  id: string;
  state: string;
  error: string | null;
  memory: { estimated_bytes: { ram: number } | null; allocated_bytes: { ram: number } | null };
  load_seconds: number | null;
  warmup_seconds: number | null;
  ready_seconds: number | null;
  loads: number;
  evictions: number;
}

function versionYaml(name: string, m: (typeof MODELS)[number], shape: { ctx: number; parallel: number }): string {
  return `      - name: ${name}\n        file: ${join(SHARED, m.file)}\n        sha256: ${m.sha}\n        chat_template: general\n        ctx_size: ${shape.ctx}\n        parallel: ${shape.parallel}\n`;
}

function modelsFile(models: Array<{ id: string; versions: string }>): string {
  const dir = mkdtempSync(join(tmpdir(), "spindle-bench-residency-"));
  const file = join(dir, "models.yaml");
  writeFileSync(file, `models:\n${models.map((m) => `  - id: ${m.id}\n    versions:\n${m.versions}`).join("")}`);
  return file;
}

async function post(url: string, body: unknown): Promise<{ status: number; ms: number; json: Record<string, unknown> }> {
  const t0 = performance.now();
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const json = (await res.json()) as Record<string, unknown>;
  return { status: res.status, ms: performance.now() - t0, json };
}

async function version(server: ServerProcess, key: string): Promise<VersionView> {
  return (await (await fetch(`${server.url}/v1/models/${encodeURIComponent(key)}`)).json()) as VersionView;
}

async function rss(server: ServerProcess): Promise<number> {
  return (await scrapeMetrics(server.url))?.get("spindle_process_resident_memory_bytes") ?? 0;
}

async function evictions(server: ServerProcess): Promise<number> {
  return (await scrapeMetrics(server.url))?.get("spindle_model_evictions_total") ?? 0;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const mib = (b: number) => (b / 2 ** 20).toFixed(2);

/** Evictions an LRU cache of `budget` bytes makes serving `sequence` one request at a time, `resident` loaded first. */
export function lruEvictions(sequence: string[], sizes: Record<string, number>, budget: number, resident: string[]): number {
  const cache = [...resident]; // least recently used first
  let evicted = 0;
  for (const m of sequence) {
    const at = cache.indexOf(m);
    if (at >= 0) {
      cache.splice(at, 1);
      cache.push(m);
      continue;
    }
    while (cache.reduce((a, x) => a + sizes[x]!, 0) + sizes[m]! > budget) {
      cache.shift();
      evicted++;
    }
    cache.push(m);
  }
  return evicted;
}

export async function residencyBench(opts: { threads: number; swaps: number; sequence: number }): Promise<{ markdown: string; data: unknown }> {
  const lines: string[] = [];
  const data: Record<string, unknown> = {};

  // 1 + 2: every model at every shape, loaded one at a time through the admin API.
  const file = modelsFile(MODELS.map((m) => ({ id: m.id, versions: SHAPES.map((s) => versionYaml(`c${s.ctx}x${s.parallel}`, m, s)).join("") })));
  const server = await startSpindleWith(["--config", file, "--threads", String(opts.threads), "--memory-budget", "8GiB"]);
  const memoryRows: Array<Record<string, unknown>> = [];
  try {
    for (const m of MODELS) {
      for (const s of SHAPES) {
        const name = `c${s.ctx}x${s.parallel}`;
        // Unload everything else of this model so the RSS delta is this version's alone.
        for (const other of SHAPES) await post(`${server.url}/admin/models/${m.id}/versions/c${other.ctx}x${other.parallel}/unload`, {});
        const before = await rss(server);
        const load = await post(`${server.url}/admin/models/${m.id}/versions/${name}/load`, {});
        if (load.status !== 200) throw new Error(`load ${m.id}@${name}: ${JSON.stringify(load.json)}`);
        const after = await rss(server);
        const v = await version(server, `${m.id}@${name}`);
        const est = v.memory.estimated_bytes!.ram;
        const alloc = v.memory.allocated_bytes!.ram;
        memoryRows.push({ model: m.id, shape: name, estimated: est, allocated: alloc, ratio: alloc / est, rssDelta: after - before, load: v.load_seconds, warmup: v.warmup_seconds, ready: v.ready_seconds });
      }
    }
  } finally {
    await server.stop();
  }
  data.memory = memoryRows;
  lines.push("## Estimated vs allocated memory, and time to ready", "");
  lines.push(`${opts.threads} thread(s). Estimate: node-llama-cpp V2 estimators on the GGUF header, before loading. Allocated: llama.cpp's memory breakdown after loading. RSS delta: the process, measured around the load (weights are mmapped, so untouched pages do not count).`, "");
  lines.push("| model | ctx x parallel | estimated MiB | allocated MiB | allocated / estimated | RSS delta MiB | load s | warm-up s | time to ready s |", "|---|---|---|---|---|---|---|---|---|");
  for (const r of memoryRows) {
    lines.push(
      `| ${r.model} | ${r.shape} | ${mib(r.estimated as number)} | ${mib(r.allocated as number)} | ${(r.ratio as number).toFixed(4)} | ${mib(r.rssDelta as number)} | ${(r.load as number).toFixed(3)} | ${(r.warmup as number).toFixed(3)} | ${(r.ready as number).toFixed(3)} |`,
    );
  }
  const worst = Math.max(...memoryRows.map((r) => Math.abs((r.ratio as number) - 1)));
  lines.push("", `Largest estimate error: ${(worst * 100).toFixed(2)}% (target: within 5%).`, "");

  const sizeOf = (id: string) => memoryRows.find((r) => r.model === id && r.shape === `c${DEFAULT_SHAPE.ctx}x${DEFAULT_SHAPE.parallel}`)!.estimated as number;

  // 3: a budget that fits one of two models: warm requests against cold swaps.
  const [a, b] = [MODELS[0]!, MODELS[2]!];
  const budget1 = Math.max(sizeOf(a.id), sizeOf(b.id)) + Math.floor(Math.min(sizeOf(a.id), sizeOf(b.id)) / 2);
  const swapFile = modelsFile([a, b].map((m) => ({ id: m.id, versions: versionYaml("v1", m, DEFAULT_SHAPE) })));
  const swapServer = await startSpindleWith(["--config", swapFile, "--threads", String(opts.threads), "--memory-budget", String(budget1)]);
  const warm: number[] = [];
  const cold: number[] = [];
  let failures = 0;
  const rssAt: number[] = [];
  try {
    const req = (model: string) => post(`${swapServer.url}/v1/completions`, { model, prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
    let current = a.id;
    for (let i = 0; i < opts.swaps; i++) {
      // Memory after each full cycle (both models loaded once more): a leak per load shows as a trend.
      if (i % 2 === 0) rssAt.push(await rss(swapServer));
      const w = await req(current);
      if (w.status !== 200) failures++;
      warm.push(w.ms);
      current = current === a.id ? b.id : a.id;
      const c = await req(current);
      if (c.status !== 200) failures++;
      cold.push(c.ms);
    }
  } finally {
    await swapServer.stop();
  }
  data.swap = { budget: budget1, warm, cold, failures, rssAt };
  lines.push("## Cold swap vs warm request", "");
  lines.push(
    `${a.id} and ${b.id} (${DEFAULT_SHAPE.ctx} x ${DEFAULT_SHAPE.parallel}) under a ${mib(budget1)} MiB budget, which holds one at a time. A warm request finds its model resident; a cold one must evict the other, load, warm up and then answer. 8 tokens each, ${opts.swaps} of each, alternating.`,
    "",
  );
  lines.push("| request | median ms | min ms | max ms |", "|---|---|---|---|");
  lines.push(`| warm | ${median(warm).toFixed(1)} | ${Math.min(...warm).toFixed(1)} | ${Math.max(...warm).toFixed(1)} |`);
  lines.push(`| cold swap | ${median(cold).toFixed(1)} | ${Math.min(...cold).toFixed(1)} | ${Math.max(...cold).toFixed(1)} |`);
  lines.push("", `Cold / warm (medians): ${(median(cold) / median(warm)).toFixed(1)}x. Failed requests: ${failures}.`, "");
  const third = Math.max(1, Math.floor(rssAt.length / 3));
  lines.push(
    `Process RSS over the ${opts.swaps * 2} requests (${opts.swaps} evictions and reloads): median of the first third ${mib(median(rssAt.slice(0, third)))} MiB, of the last third ${mib(median(rssAt.slice(-third)))} MiB.`,
    "",
  );

  // 4: three models, a budget that holds two of the smaller ones or the big one alone.
  const trio = [MODELS[0]!, MODELS[1]!, MODELS[2]!];
  const sizes = Object.fromEntries(trio.map((m) => [m.id, sizeOf(m.id)]));
  const budget2 = sizeOf(MODELS[2]!.id) + Math.floor(sizeOf(MODELS[0]!.id) / 2);
  let seed = 7;
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  // Skewed traffic: the first model is the hot one.
  const sequence = Array.from({ length: opts.sequence }, () => {
    const x = rand();
    return x < 0.5 ? trio[0]!.id : x < 0.8 ? trio[1]!.id : trio[2]!.id;
  });
  const trioFile = modelsFile(trio.map((m) => ({ id: m.id, versions: versionYaml("v1", m, DEFAULT_SHAPE) })));
  const trioServer = await startSpindleWith(["--config", trioFile, "--threads", String(opts.threads), "--memory-budget", String(budget2)]);
  let ok = 0;
  let measured = 0;
  let peakRss = 0;
  const residentAtStart: string[] = [];
  try {
    for (const m of trio) if ((await version(trioServer, `${m.id}@v1`)).state === "ready") residentAtStart.push(m.id);
    for (const m of sequence) {
      const r = await post(`${trioServer.url}/v1/completions`, { model: m, prompt: "Once upon a time", max_tokens: 4, temperature: 0 });
      if (r.status === 200) ok++;
      peakRss = Math.max(peakRss, await rss(trioServer));
    }
    measured = await evictions(trioServer);
  } finally {
    await trioServer.stop();
  }
  const predicted = lruEvictions(sequence, sizes, budget2, residentAtStart);
  data.lru = { budget: budget2, sizes, sequence, residentAtStart, ok, measured, predicted, peakRss };
  lines.push("## LRU under a budget", "");
  lines.push(
    `${trio.map((m) => `${m.id} (${mib(sizes[m.id]!)} MiB)`).join(", ")} under a ${mib(budget2)} MiB budget; ${opts.sequence} sequential requests, 50% / 30% / 20% of traffic; resident after start: ${residentAtStart.join(", ")}.`,
    "",
  );
  lines.push("| requests | succeeded | evictions measured | evictions LRU predicts | peak RSS MiB |", "|---|---|---|---|---|");
  lines.push(`| ${sequence.length} | ${ok} | ${measured} | ${predicted} | ${mib(peakRss)} |`, "");
  return { markdown: lines.join("\n"), data };
}
