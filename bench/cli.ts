/**
 * npm run bench -- <command> [options]
 *
 *   serve   measure one or more OpenAI-compatible servers, side by side (A B A B …)
 *   w1      workload W1 of the scheduler issue: this server vs llama-server vs the raw engine
 *   engine  the engine ceiling alone (node-llama-cpp with no HTTP)
 *   telemetry  W1 with metrics and tracing on against both off (their per-token cost)
 *   w2      W1 on the ~25M-parameter synthetic model (compute-bound)
 *   residency  estimated vs allocated memory, load/warm-up/ready times, cold swap vs warm, LRU swaps under a budget
 *   soak    minutes of mixed traffic (cancels, deadlines, overload): served, errors, RSS and heap
 *   synth   write a synthetic GGUF: --preset tiny|25m|llama-1b|llama-8b --weights f16|q8_0 --seed N --out FILE
 *   micro   small measurements behind README figures: startup, histogram, threads, top-k, flash-attention
 *
 * Figures follow vLLM `bench serve` definitions (see bench/lib/stats.ts). Run on an idle
 * machine; compare ratios measured in one run, and read medians.
 */
import { execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { ceilingBuild, engineCeiling } from "./engine-ceiling.js";
import { ENGINE_BINARIES, type EngineBinary } from "../src/engine/types.js";
import { micro, MICRO_COMMANDS, type MicroCommand } from "./micro.js";
import { soak } from "./soak.js";
import { residencyBench } from "./residency.js";
import { newestReport, sizingTable } from "./sizing.js";
import { renderChart, type ChartPoint } from "./lib/chart.js";
import { PRESETS, writeSyntheticGguf, type WeightType } from "./synthetic-gguf.js";
import { arrivalGaps, closedLoop, openLoop, rng } from "./lib/load.js";
import { ROOT, startLlamaServer, startSpindle, startSpindleWith, type ServerProcess } from "./lib/processes.js";
import { parseSlo, summarize, type RunMetrics, type Slo } from "./lib/stats.js";
import { streamRequest, type RequestRecord } from "./lib/stream-client.js";
import { engineBuildOf, scrapeMetrics, serverView, type ServerMetricsView } from "./lib/server-metrics.js";

interface Target {
  name: string;
  url: string;
}

interface Workload {
  endpoint: "chat" | "completions";
  model: string;
  prompt: string;
  maxTokens: number;
  temperature: number;
  ignoreEos: boolean;
  randomInput: number | undefined;
  /** Turns per conversation (multi-turn chat); 1 is single requests. */
  turns: number;
  seed: number;
}

interface RunResult {
  target: string;
  round: number;
  concurrency: number;
  rate: number | undefined;
  metrics: RunMetrics;
  server: ServerView | undefined;
}

/** What the server itself says about the run, when it exposes it (Spindle's model extras). */
interface ServerView {
  stepFullness: number | undefined;
  tokensPerStep: number | undefined;
  /** From the target's /metrics, scraped before and after the run. */
  metrics?: ServerMetricsView;
}

const WORDS = "the cat dog sun moon tree girl boy ran saw big red little happy sad park ball home day night".split(" ");

function promptFor(w: Workload, i: number): string {
  if (w.randomInput === undefined) return w.prompt;
  const rand = rng(w.seed * 100_003 + i);
  return Array.from({ length: w.randomInput }, () => WORDS[Math.floor(rand() * WORDS.length)]).join(" ");
}

function body(w: Workload, i: number): Record<string, unknown> {
  const b: Record<string, unknown> = { model: w.model, max_tokens: w.maxTokens, temperature: w.temperature };
  if (w.ignoreEos) b.ignore_eos = true;
  if (w.endpoint === "chat") b.messages = [{ role: "user", content: promptFor(w, i) }];
  else b.prompt = promptFor(w, i);
  return b;
}

async function scrapeSteps(t: Target, model: string): Promise<{ steps: number; items: number; expected: number; tokens: number } | undefined> {
  try {
    const res = await fetch(`${t.url}/v1/models/${encodeURIComponent(model)}`);
    if (!res.ok) return undefined;
    const m = await res.json();
    return m.scheduler?.steps !== undefined ? m.scheduler : undefined;
  } catch {
    return undefined;
  }
}

class Progress {
  private done = 0;
  constructor(private readonly label: string, private readonly total: number) {}
  tick = () => {
    this.done++;
    if (process.stderr.isTTY) {
      const width = 30;
      const filled = Math.round((this.done / this.total) * width);
      process.stderr.write(`\r${this.label} [${"#".repeat(filled)}${".".repeat(width - filled)}] ${this.done}/${this.total}`);
      if (this.done === this.total) process.stderr.write("\n");
    }
  };
}

/**
 * A multi-turn chat generated locally from the seed: each turn sends the whole
 * conversation so far (the server's reply included) plus a new user message.
 */
async function conversation(t: Target, w: Workload, i: number): Promise<RequestRecord[]> {
  const rand = rng(w.seed * 7919 + i);
  const say = (n: number) => Array.from({ length: n }, () => WORDS[Math.floor(rand() * WORDS.length)]).join(" ");
  const messages: Array<{ role: string; content: string }> = [{ role: "user", content: w.randomInput ? say(w.randomInput) : w.prompt }];
  const records: RequestRecord[] = [];
  for (let turn = 0; turn < w.turns; turn++) {
    const rec = await streamRequest({ baseUrl: t.url, endpoint: "chat", body: { model: w.model, max_tokens: w.maxTokens, temperature: w.temperature, messages, ...(w.ignoreEos ? { ignore_eos: true } : {}) } });
    records.push(rec);
    if (!rec.ok) break;
    messages.push({ role: "assistant", content: rec.text }, { role: "user", content: say(8 + Math.floor(rand() * 16)) });
  }
  return records;
}

async function runOnce(t: Target, w: Workload, opts: { concurrency: number; requests: number; durationS?: number; rate?: number; burstiness: number; slo?: Slo; round: number }): Promise<RunResult> {
  const before = await scrapeSteps(t, w.model);
  const metricsBefore = await scrapeMetrics(t.url);
  const progress = new Progress(`${t.name} c=${opts.concurrency}${opts.rate ? ` rate=${opts.rate}` : ""} round ${opts.round + 1}`, opts.requests);
  const job = (i: number): Promise<RequestRecord[]> =>
    w.turns > 1 ? conversation(t, w, i) : streamRequest({ baseUrl: t.url, endpoint: w.endpoint, body: body(w, i) }).then((r) => [r]);
  const t0 = performance.now();
  let records: RequestRecord[];
  if (opts.rate !== undefined) {
    records = (await openLoop(arrivalGaps(opts.requests, opts.rate, opts.burstiness, w.seed + opts.round), opts.concurrency, job, progress.tick)).flat();
  } else if (opts.durationS !== undefined) {
    // Until the time is up: every worker starts a new request while any time is left.
    const end = t0 + opts.durationS * 1000;
    const all: RequestRecord[] = [];
    let next = 0;
    await Promise.all(
      Array.from({ length: opts.concurrency }, async () => {
        while (performance.now() < end) all.push(...(await job(next++)));
      }),
    );
    records = all;
  } else {
    records = (await closedLoop(opts.concurrency, opts.requests, job, progress.tick)).flat();
  }
  const durationS = (performance.now() - t0) / 1000;
  const after = await scrapeSteps(t, w.model);
  const metricsView = serverView(metricsBefore, await scrapeMetrics(t.url));
  let server: ServerView | undefined;
  if ((before && after && after.steps > before.steps) || metricsView) {
    server = {
      stepFullness: before && after && after.steps > before.steps ? (after.items - before.items) / (after.expected - before.expected) : undefined,
      tokensPerStep: before && after && after.steps > before.steps ? (after.tokens - before.tokens) / (after.steps - before.steps) : undefined,
      metrics: metricsView,
    };
  }
  return { target: t.name, round: opts.round, concurrency: opts.concurrency, rate: opts.rate, metrics: summarize(records, durationS, opts.slo), server };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

const f0 = (x: number) => (Number.isFinite(x) ? x.toFixed(0) : "–");
const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : "–");
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : "–");

function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i]!)).join(" | ")} |`;
  return [line(headers), `|${widths.map((w) => "-".repeat(w + 2)).join("|")}|`, ...rows.map(line)].join("\n");
}

/** Failed requests over the rounds, with why, and those sent again: "3 (http_429 2, network 1), 2 resent". */
function failures(rs: RunResult[]): string {
  const total = rs.reduce((a, r) => a + r.metrics.failed, 0);
  const resends = rs.reduce((a, r) => a + r.metrics.resent, 0);
  const resent = resends > 0 ? `, ${resends} resent` : "";
  if (total === 0) return `0${resent}`;
  const by: Record<string, number> = {};
  for (const r of rs) for (const [k, n] of Object.entries(r.metrics.failedByType)) by[k] = (by[k] ?? 0) + n;
  return `${total} (${Object.entries(by)
    .sort((a, b) => b[1] - a[1])
    .map(([k, n]) => `${k} ${n}`)
    .join(", ")})${resent}`;
}

/** Per concurrency and target: medians over rounds; ratios against the first target, round by round. */
function report(results: RunResult[], targets: string[]): string {
  const levels = [...new Set(results.map((r) => r.concurrency))];
  const rows: string[][] = [];
  for (const c of levels) {
    for (const t of targets) {
      const rs = results.filter((r) => r.concurrency === c && r.target === t);
      if (rs.length === 0) continue;
      const m = (pick: (r: RunResult) => number) => median(rs.map(pick));
      const base = results.filter((r) => r.concurrency === c && r.target === targets[0]);
      const ratios = (pick: (r: RunResult) => number) => {
        const pairs = rs.map((r) => {
          const b = base.find((x) => x.round === r.round);
          return b ? pick(r) / pick(b) : NaN;
        });
        const med = median(pairs);
        const spread = pairs.length > 1 ? `${f2(Math.min(...pairs))}–${f2(Math.max(...pairs))}` : "";
        return t === targets[0] ? "1.00" : `${f2(med)}${spread ? ` (${spread})` : ""}`;
      };
      const fullness = rs.map((r) => r.server?.stepFullness).filter((x): x is number => x !== undefined);
      rows.push([
        String(c),
        t,
        f0(m((r) => r.metrics.outputThroughput)),
        ratios((r) => r.metrics.outputThroughput),
        f1(m((r) => r.metrics.ttftMs.median)),
        ratios((r) => r.metrics.ttftMs.median),
        f2(m((r) => r.metrics.tpotMs.median)),
        f2(m((r) => r.metrics.itlMs.median)),
        f1(m((r) => r.metrics.e2eMs.median)),
        failures(rs),
        fullness.length ? `${f1(median(fullness) * 100)}%` : "–",
      ]);
    }
  }
  const main = table(["c", "target", "out tok/s", "× first", "TTFT ms", "× first", "TPOT ms", "ITL ms", "E2E ms", "failed", "step fullness"], rows);
  // The servers' own figures, where their /metrics has them, beside the client's.
  const serverRows: string[][] = [];
  for (const c of levels) {
    for (const t of targets) {
      const views = results.filter((r) => r.concurrency === c && r.target === t && r.server?.metrics).map((r) => ({ view: r.server!.metrics!, client: r.metrics }));
      if (views.length === 0) continue;
      const m = (pick: (v: ServerMetricsView) => number | undefined) => median(views.map((x) => pick(x.view)).filter((x): x is number => x !== undefined));
      serverRows.push([String(c), t, views[0]!.view.source, f0(m((v) => v.generatedTokens)), f0(median(views.map((x) => x.client.totalOutputTokens))), f1(m((v) => v.meanTtftMs)), f1(median(views.map((x) => x.client.ttftMs.mean))), f2(m((v) => v.meanQueueMs))]);
    }
  }
  if (serverRows.length === 0) return main;
  return `${main}\n\nServer-side view (from each target's /metrics, median per run):\n\n${table(["c", "target", "source", "tokens (server)", "tokens (client)", "mean TTFT ms (server)", "mean TTFT ms (client)", "mean queue ms"], serverRows)}`;
}

/** Medians per target and concurrency, for the chart. */
function chartPoints(results: RunResult[]): ChartPoint[] {
  const keys = [...new Set(results.map((r) => `${r.target}\u0000${r.concurrency}`))];
  return keys.map((k) => {
    const [target, c] = k.split("\u0000");
    const rs = results.filter((r) => r.target === target && r.concurrency === Number(c));
    return {
      target: target!,
      concurrency: Number(c),
      outputTokensPerSecond: median(rs.map((r) => r.metrics.outputThroughput)),
      ttftMs: median(rs.map((r) => r.metrics.ttftMs.median)),
    };
  });
}

/** Full results as JSON, the table as Markdown, and the chart as SVG. */
async function writeOutputs(dir: string, name: string, json: { results: RunResult[]; [key: string]: unknown }, markdown: string, title: string): Promise<void> {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, `${name}.json`), JSON.stringify(json, null, 2));
  const svg = await renderChart(chartPoints(json.results), title);
  writeFileSync(join(dir, `${name}.svg`), svg);
  writeFileSync(join(dir, `${name}.md`), `${markdown}\n![${title}](${name}.svg)\n`);
  process.stderr.write(`wrote ${join(dir, name)}.{json,md,svg}\n`);
}

const commonOptions = {
  endpoint: { type: "string", default: "chat" },
  model: { type: "string" },
  prompt: { type: "string", default: "Once upon a time" },
  "max-tokens": { type: "string", default: "128" },
  temperature: { type: "string", default: "0" },
  "ignore-eos": { type: "boolean", default: false },
  "random-input": { type: "string" },
  turns: { type: "string", default: "1" },
  duration: { type: "string" },
  concurrency: { type: "string", default: "1,4,8,16" },
  requests: { type: "string" },
  rounds: { type: "string", default: "3" },
  warmup: { type: "string", default: "2" },
  rate: { type: "string" },
  burstiness: { type: "string", default: "1" },
  slo: { type: "string" },
  seed: { type: "string", default: "1" },
  out: { type: "string", default: join(ROOT, ".bench", "results") },
} as const;

function workloadFrom(v: Record<string, unknown>, model: string): Workload {
  return {
    endpoint: v.endpoint === "completions" ? "completions" : "chat",
    model,
    prompt: String(v.prompt),
    maxTokens: Number(v["max-tokens"]),
    temperature: Number(v.temperature),
    ignoreEos: v["ignore-eos"] === true,
    randomInput: v["random-input"] !== undefined ? Number(v["random-input"]) : undefined,
    turns: Number(v.turns),
    seed: Number(v.seed),
  };
}

async function sideBySide(targetsFor: (c: number) => Promise<{ targets: Target[]; stop: () => Promise<void> }>, w: Workload, v: Record<string, unknown>, extra?: (c: number, round: number) => Promise<RunResult | undefined>): Promise<RunResult[]> {
  const levels = String(v.concurrency).split(",").map(Number);
  const rounds = Number(v.rounds);
  const slo = parseSlo(v.slo as string | undefined);
  const rate = v.rate !== undefined ? Number(v.rate) : undefined;
  const results: RunResult[] = [];
  for (const c of levels) {
    const { targets, stop } = await targetsFor(c);
    try {
      for (const t of targets) await closedLoop(1, Number(v.warmup), (i) => streamRequest({ baseUrl: t.url, endpoint: w.endpoint, body: body(w, i) }));
      const requests = v.requests !== undefined ? Number(v.requests) : c * 4;
      // A B A B …: alternate targets run by run so drift on a noisy machine hits both,
      // and rotate who goes first each round so no target always follows the same one.
      for (let round = 0; round < rounds; round++) {
        const order = targets.map((_, i) => targets[(i + round) % targets.length]!);
        const durationS = v.duration !== undefined ? Number(v.duration) : undefined;
        for (const t of order) results.push(await runOnce(t, w, { concurrency: c, requests, durationS, rate, burstiness: Number(v.burstiness), slo, round }));
        const e = await extra?.(c, round);
        if (e) results.push(e);
      }
    } finally {
      await stop();
    }
  }
  return results;
}

/** A synthetic model in the scratch folder (made once per preset, weights and seed); returns its path. */
/** A variant of a preset: fewer layers, zeroed layers, sharper logits (the draft benchmark's pairs). */
interface ShapeVariant {
  layers?: number;
  zeroFrom?: number;
  outputScale?: number;
}

async function synthesize(preset: string, weights: WeightType, seed: number, tokenizerFrom: string | undefined, out: string | undefined, variant: ShapeVariant = {}): Promise<string> {
  const base = PRESETS[preset];
  if (!base) throw new Error(`unknown preset "${preset}": ${Object.keys(PRESETS).join(", ")}`);
  const shape = { ...base, layers: variant.layers ?? base.layers };
  const tag = `${variant.layers !== undefined ? `-l${variant.layers}` : ""}${variant.zeroFrom !== undefined ? `-z${variant.zeroFrom}` : ""}${variant.outputScale !== undefined ? `-x${variant.outputScale}` : ""}`;
  const scratch = process.env.SPINDLE_BENCH_DIR ?? join(process.env.TMPDIR ?? "/tmp", "spindle-bench");
  const path = resolve(out ?? join(scratch, `synthetic-${preset}${tag}-${weights}-s${seed}.gguf`));
  const { existsSync } = await import("node:fs");
  if (existsSync(path)) return path;
  mkdirSync(join(path, ".."), { recursive: true });
  const r = await writeSyntheticGguf(path, {
    shape,
    weights,
    seed,
    tokenizerFrom: tokenizerFrom ?? join(ROOT, "..", "shared", "models", "llama-2-tiny-random-chat.gguf"),
    name: `synthetic-${preset}${tag}`,
    zeroFrom: variant.zeroFrom,
    outputScale: variant.outputScale,
  });
  process.stderr.write(`synthesized ${path}: ${preset} (${shape.note}), ${r.parameters} parameters, ${weights}, ${r.bytes} bytes\n`);
  return path;
}

/** Every command: what it does and its options, for `--help`. */
const LOAD_HELP = `workload (serve, w1, w2, telemetry):
  --endpoint chat|completions   API to call (default chat)
  --model NAME                  model name to request (serve: required by most servers)
  --prompt TEXT                 fixed prompt (default "Once upon a time")
  --random-input N              random prompts of N words instead, from --seed
  --max-tokens N                output tokens per request (default 128)
  --ignore-eos                  generate exactly --max-tokens where the server honours vLLM's ignore_eos
  --temperature T               (default 0)
  --turns N                     multi-turn chats: each turn resends the conversation (default 1)
load:
  --concurrency LIST            closed loop: requests in flight, e.g. 1,4,8,16 (default); with --rate, the cap
  --requests N                  per run (default 4 × concurrency)
  --duration S                  run for S seconds instead of a count
  --rate R                      open loop: R requests/s arriving as a gamma process
  --burstiness B                1 = Poisson (default), < 1 burstier, > 1 smoother
  --rounds N                    rounds per level, targets alternating A B A B (default 3)
  --warmup N                    requests per target before measuring (default 2)
  --slo ttft=200ms,tpot=20ms    goodput: share of requests within every bound
  --seed N                      for prompts and arrivals (default 1)
  --out DIR                     results folder (default .bench/results)`;

const COMMANDS: Record<string, { summary: string; help: string }> = {
  serve: { summary: "measure OpenAI-compatible servers side by side", help: `--target URL[=NAME] (repeat for more servers; ratios are against the first)
${LOAD_HELP}` },
  w1: { summary: "this server vs llama-server vs the raw engine on stories260K", help: `--threads N (default 1) --llama-server PATH | --no-llama-server --model-path FILE
  --spindle NAME=ARGS           a Spindle target started with extra server arguments (repeat for more, side by side;
                                default one target, "spindle", with none), e.g. --spindle "local-fa=--engine-build local --flash-attention on"
  --mmap on|off                 off: every side reads the weights into memory (--no-mmap) instead of mapping them (default on; W3: off)
${LOAD_HELP}` },
  w2: { summary: "W1 on the ~25M-parameter synthetic model (compute-bound)", help: `as w1; the model is synthesized once into $TMPDIR/spindle-bench
${LOAD_HELP}` },
  w3: { summary: "W1 on Llama 3.2 1B's shape (Q8_0 or Q4_0): c=1,4, 32 output tokens", help: "as w1; --weights q8_0|q4_0 (default q8_0); --mmap defaults to off (weights read into memory on every side); the model (0.6-1.2 GB) is synthesized once into $TMPDIR/spindle-bench" },
  engine: { summary: "the engine ceiling alone: node-llama-cpp with no HTTP", help: "--concurrency LIST --rounds N --threads N --max-tokens N --model-path FILE" },
  telemetry: { summary: "W1 with metrics and tracing on against both off", help: `--threads N --model-path FILE
${LOAD_HELP}` },
  residency: { summary: "memory estimates vs allocations, load times, cold swaps, LRU evictions", help: "--threads N (default 1) --swaps N (default 10) --requests N (default 60) --out DIR" },
  soak: { summary: "minutes of mixed traffic: cancels, deadlines, overload; RSS and heap", help: "--minutes N (default 10) --concurrency N (default 24) --threads N --model-path FILE" },
  synth: {
    summary: "write a synthetic GGUF of a named shape",
    help: `--preset ${Object.keys(PRESETS).join("|")} (default 25m) --weights f16|q8_0|q4_0 (default q8_0) --seed N --tokenizer-from FILE --out FILE
${Object.entries(PRESETS)
      .map(([k, p]) => `  ${k}: ${p.note}`)
      .join("\n")}`,
  },
  slots: {
    summary: "what slot classes cost: one context of 8x512 against 7x512,1x1024 (two contexts), side by side",
    help: "--model-path FILE (default: stories260K, W1; --w2 for the synthetic 25m) --w2 --concurrency LIST (default 8) --rounds N --threads N --classes A;B (default 8x512;7x512,1x1024)",
  },
  spec: {
    summary: "speculative decoding by prompt lookup against none, on a prompt the output repeats",
    help: "--concurrency LIST (default 1,8) --rounds N --threads N --model-path FILE --w2 --prompt TEXT --endpoint chat|completions",
  },
  draft: {
    summary: "speculative decoding with a draft model against none, on Llama 3.2 1B's shape: a 1-layer draft that agrees with the target, and one that never does",
    help: `--weights q4_0|q8_0 (default q4_0) --draft-tokens LIST (default 2,4,8: a pair of servers each) --concurrency LIST (default 1,4) --rounds N --threads N --max-tokens N (default 64)
The target has 16 layers of which the last 15 have zero output projections: it costs what a 1B model
costs and says what its first layer says, so a 1-layer draft with the same seed agrees with it token for
token (the ceiling of what a draft can give at this cost ratio), and one with another seed never does
(the floor: every guess evaluated and refused). Logits are sharpened (output x50) so the models are sure
of their tokens, as trained ones are. The three models are synthesized once into $TMPDIR/spindle-bench.`,
  },
  sizing: {
    summary: "a sizing table (replicas and memory for N streams) from a W1/W2 report",
    help: "--report FILE (default: the newest w2, else w1, report in .bench/results) --model-path FILE (default: the report's model) --target NAME (default: the report's first) --streams N (default 100) --ctx-size N (default 512)",
  },
  micro: { summary: "small measurements behind README figures", help: `micro ${MICRO_COMMANDS.join("|")} [--rounds N (default 5)] [--engine-build auto|prebuilt|local (flash-attention, sampler)]; step-thread needs a local build of the mended addon, and runs as the server does on 2 cores with UV_THREADPOOL_SIZE=1` },
};

function usage(): string {
  return [
    "Usage: npm run bench -- <command> [options]   (npm run bench -- <command> --help for its options)",
    "",
    ...Object.entries(COMMANDS).map(([k, c]) => `  ${k.padEnd(10)} ${c.summary}`),
    "",
    "Figures follow vLLM's `bench serve` definitions; compare ratios measured in one run, and read medians.",
  ].join("\n");
}

async function main(): Promise<void> {
  const [command, ...rest] = process.argv.slice(2);
  if (command === undefined || command === "--help" || command === "-h" || command === "help") {
    process.stdout.write(`${usage()}\n`);
    return;
  }
  const spec = COMMANDS[command];
  if (!spec) throw new BenchError(`unknown command "${command}" (${Object.keys(COMMANDS).join(", ")}; --help for more)`);
  if (rest.includes("--help") || rest.includes("-h")) {
    process.stdout.write(`npm run bench -- ${command}: ${spec.summary}\n\n${spec.help}\n`);
    return;
  }
  await run(command, rest);
}

/** A mistake in how the bench was called: one line, exit 2. */
class BenchError extends Error {}

async function run(command: string, rest: string[]): Promise<void> {
  if (command === "serve") {
    const { values: v } = parseArgs({ args: rest, options: { ...commonOptions, target: { type: "string", multiple: true } } });
    const targets = (v.target ?? []).map((t, i) => {
      const [url, name] = t.split("=");
      return { url: url!, name: name ?? `target${i + 1}` };
    });
    if (targets.length === 0) throw new BenchError("serve needs at least one --target URL[=NAME] (npm run bench -- serve --help)");
    for (const t of targets) {
      if (!/^https?:\/\/[^/]+/.test(t.url)) throw new BenchError(`--target ${t.url}: expected a URL such as http://127.0.0.1:8080`);
    }
    const w = workloadFrom(v, v.model ?? "default");
    const results = await sideBySide(async () => ({ targets, stop: async () => {} }), w, v);
    const md = report(results, targets.map((t) => t.name));
    process.stdout.write(`${md}\n`);
    await writeOutputs(String(v.out), `serve-${Date.now()}`, { workload: w, results }, `# Benchmark\n\n${JSON.stringify(w)}\n\n${md}\n`, "Benchmark");
    return;
  }
  if (command === "telemetry") {
    // W1 with metrics and tracing on (spans go to a local OTLP sink) against both off.
    const { values: v } = parseArgs({ args: rest, options: { ...commonOptions, threads: { type: "string", default: "1" }, "model-path": { type: "string" } } });
    const modelPath = resolve(v["model-path"] ?? join(ROOT, "..", "shared", "models", "stories260K.gguf"));
    let spanBytes = 0;
    const sink = createServer((req, res) => {
      req.on("data", (d: Buffer) => (spanBytes += d.length));
      req.on("end", () => res.writeHead(200, { "content-type": "application/json" }).end("{}"));
    });
    await new Promise<void>((r) => sink.listen(0, "127.0.0.1", r));
    const sinkAddr = sink.address();
    const otlp = `http://127.0.0.1:${typeof sinkAddr === "object" && sinkAddr ? sinkAddr.port : 0}`;
    const w = workloadFrom(v, "stories260K");
    const threads = Number(v.threads);
    const results = await sideBySide(
      async (c) => {
        const slots = Math.max(8, c);
        const on = await startSpindle({ modelPath, id: "stories260K", parallel: slots, ctxSize: 512, threads, extraArgs: ["--metrics", "on", "--otlp-endpoint", otlp] });
        const off = await startSpindle({ modelPath, id: "stories260K", parallel: slots, ctxSize: 512, threads, extraArgs: ["--metrics", "off"] });
        return {
          targets: [
            { name: "telemetry-off", url: off.url },
            { name: "telemetry-on", url: on.url },
          ],
          stop: async () => void (await Promise.all([on.stop(), off.stop()])),
        };
      },
      w,
      v,
    );
    sink.close();
    const md = report(results, ["telemetry-off", "telemetry-on"]);
    const header = `Telemetry cost on W1: metrics + OTLP tracing on vs off, ${threads} thread(s), ${v.rounds} rounds (medians); ${spanBytes} bytes of spans received`;
    process.stdout.write(`${header}\n\n${md}\n`);
    await writeOutputs(String(v.out), `telemetry-${Date.now()}`, { workload: w, results, spanBytes }, `# ${header}\n\n${md}\n`, "Telemetry on vs off");
    return;
  }
  if (command === "residency") {
    const { values: v } = parseArgs({ args: rest, options: { threads: { type: "string", default: "1" }, swaps: { type: "string", default: "10" }, requests: { type: "string", default: "60" }, out: { type: "string", default: join(ROOT, ".bench", "results") } } });
    const r = await residencyBench({ threads: Number(v.threads), swaps: Number(v.swaps), sequence: Number(v.requests) });
    process.stdout.write(`${r.markdown}\n`);
    mkdirSync(String(v.out), { recursive: true });
    const name = `residency-${Date.now()}`;
    writeFileSync(join(String(v.out), `${name}.json`), JSON.stringify(r.data, null, 2));
    writeFileSync(join(String(v.out), `${name}.md`), `# Model residency\n\n${r.markdown}\n`);
    process.stderr.write(`wrote ${join(String(v.out), name)}.{json,md}\n`);
    return;
  }
  if (command === "soak") {
    const { values: v } = parseArgs({ args: rest, options: { minutes: { type: "string", default: "10" }, concurrency: { type: "string", default: "24" }, threads: { type: "string", default: "1" }, "model-path": { type: "string" } } });
    const r = await soak({
      modelPath: resolve(v["model-path"] ?? join(ROOT, "..", "shared", "models", "stories260K.gguf")),
      minutes: Number(v.minutes),
      concurrency: Number(v.concurrency),
      threads: Number(v.threads),
    });
    process.stdout.write(
      `soak ${r.minutes} min: ${r.served} served; errors ${JSON.stringify(r.errors)}; RSS ${r.rssStartMiB.toFixed(1)} → ${r.rssEndMiB.toFixed(1)} MiB; heap ${r.heapStartMiB.toFixed(1)} → ${r.heapEndMiB.toFixed(1)} MiB; every 30 s [min, RSS, heap]: ${JSON.stringify(r.samples)}\n`,
    );
    return;
  }
  if (command === "slots" || command === "spec") {
    const { values: v } = parseArgs({
      args: rest,
      options: {
        ...commonOptions,
        concurrency: { type: "string", default: command === "slots" ? "8" : "1,8" },
        threads: { type: "string", default: "1" },
        "model-path": { type: "string" },
        w2: { type: "boolean", default: false },
        classes: { type: "string", default: "8x512;7x512,1x1024" },
      },
    });
    const modelPath = resolve(v["model-path"] ?? (v.w2 ? await synthesize("25m", "q8_0", 1, undefined, undefined) : join(ROOT, "..", "shared", "models", "stories260K.gguf")));
    // slots: one server per layout; spec: with and without prompt lookup, on a prompt that holds
    // the text the model will write (stories260K's greedy story, told once already).
    const variants: Array<{ name: string; args: string[] }> =
      command === "slots"
        ? String(v.classes).split(";").map((l) => ({ name: `slots ${l}`, args: ["--slots", l] }))
        : [
            { name: "no speculation", args: ["--parallel", "8", "--ctx-size", "1024"] },
            { name: "ngram:4", args: ["--parallel", "8", "--ctx-size", "1024", "--speculative", "ngram:4"] },
          ];
    if (command === "spec" && v.prompt === "Once upon a time") {
      v.prompt = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.\n\nOnce upon a time";
      v.endpoint = "completions";
    }
    const names = variants.map((x) => x.name);
    const w = workloadFrom(v, "stories260K");
    const results = await sideBySide(
      async () => {
        const procs = await Promise.all(variants.map((x) => startSpindleWith(["--model", `${modelPath}=stories260K`, ...x.args, "--threads", String(v.threads), "--max-queue", "1024"])));
        return { targets: procs.map((p, i) => ({ name: names[i]!, url: p.url })), stop: async () => void (await Promise.all(procs.map((p) => p.stop()))) };
      },
      w,
      v,
    );
    const md = report(results, names);
    const header = `${command === "slots" ? "Slot classes" : "Speculative decoding"} on ${modelPath.split("/").pop()}: ${w.endpoint} "${w.prompt.slice(0, 40)}…", max_tokens ${w.maxTokens}, ${v.threads} thread(s), ${v.rounds} rounds (medians, A B A B)`;
    process.stdout.write(`${header}\n\n${md}\n`);
    await writeOutputs(String(v.out), `${command}-${Date.now()}`, { workload: w, modelPath, results }, `# ${header}\n\n${md}\n`, command === "slots" ? "Slot classes" : "Speculative decoding");
    return;
  }
  if (command === "draft") {
    const { values: v } = parseArgs({
      args: rest,
      options: {
        ...commonOptions,
        concurrency: { type: "string", default: "1,4" },
        "max-tokens": { type: "string", default: "64" },
        endpoint: { type: "string", default: "completions" },
        threads: { type: "string", default: "1" },
        weights: { type: "string", default: "q4_0" },
        "draft-tokens": { type: "string", default: "2,4,8" },
      },
    });
    const weights = v.weights as WeightType;
    const sharp = 50;
    const target = await synthesize("llama-1b", weights, 1, undefined, undefined, { zeroFrom: 1, outputScale: sharp });
    const agrees = await synthesize("llama-1b", weights, 1, undefined, undefined, { layers: 1, outputScale: sharp });
    const never = await synthesize("llama-1b", weights, 2, undefined, undefined, { layers: 1, outputScale: sharp });
    const slots = Math.max(...String(v.concurrency).split(",").map(Number));
    const n = String(v["draft-tokens"]);
    const variants: Array<{ name: string; args: string[] }> = [{ name: "no draft", args: [] }];
    for (const k of n.split(",")) variants.push({ name: `draft:${k} agrees`, args: ["--model-draft", agrees, "--speculative", `draft:${k}`] });
    for (const k of n.split(",")) variants.push({ name: `draft:${k} never agrees`, args: ["--model-draft", never, "--speculative", `draft:${k}`] });
    const names = variants.map((x) => x.name);
    const acceptance = new Map<string, { accepted: number; rejected: number }>();
    const w = workloadFrom(v, "llama-1b");
    const results = await sideBySide(
      async () => {
        // One at a time: three 1B servers side by side would share two cores while loading.
        const procs: ServerProcess[] = [];
        for (const x of variants) procs.push(await startSpindleWith(["--model", `${target}=llama-1b`, "--parallel", String(slots), "--ctx-size", "512", ...x.args, "--threads", String(v.threads), "--max-queue", "1024"]));
        const stop = async () => {
          // What each draft did, from the server's own counters, before it goes.
          for (const [i, p] of procs.entries()) {
            const m = (await (await fetch(`${p.url}/v1/models/llama-1b`)).json()) as { versions: Array<{ speculative: { accepted: number; rejected: number } | null }> };
            const s = m.versions[0]!.speculative;
            if (s) acceptance.set(names[i]!, s);
          }
          await Promise.all(procs.map((p) => p.stop()));
        };
        return { targets: procs.map((p, i) => ({ name: names[i]!, url: p.url })), stop };
      },
      w,
      v,
    );
    const acceptanceLine = [...acceptance].map(([k, s]) => `${k}: ${s.accepted} of ${s.accepted + s.rejected} guesses kept`).join("; ");
    const md = `${report(results, names)}\n\n${acceptanceLine}`;
    const header = `Draft model on ${target.split("/").pop()} (16 layers, 15 of them adding nothing): ${w.endpoint} "${w.prompt.slice(0, 40)}", max_tokens ${w.maxTokens}, ${v.threads} thread(s), ${v.rounds} rounds (medians, A B A B)`;
    process.stdout.write(`${header}\n\n${md}\n`);
    await writeOutputs(String(v.out), `draft-${Date.now()}`, { workload: w, modelPath: target, drafts: { agrees, never }, results }, `# ${header}\n\n${md}\n`, "Draft model");
    return;
  }
  if (command === "sizing") {
    const { values: v } = parseArgs({
      args: rest,
      options: { report: { type: "string" }, "model-path": { type: "string" }, target: { type: "string" }, streams: { type: "string", default: "100" }, "ctx-size": { type: "string", default: "512" } },
    });
    const report = v.report ?? newestReport(join(ROOT, ".bench", "results"));
    if (!report) throw new BenchError("no W1/W2 report in .bench/results: run npm run bench -- w2 first, or pass --report FILE");
    const recorded = (JSON.parse((await import("node:fs")).readFileSync(report, "utf8")) as { modelPath?: string }).modelPath;
    const modelPath = v["model-path"] ?? recorded ?? (report.includes("/w2-") ? await synthesize("25m", "q8_0", 1, undefined, undefined) : join(ROOT, "..", "shared", "models", "stories260K.gguf"));
    const streams = Number(v.streams);
    if (!Number.isInteger(streams) || streams < 1) throw new BenchError(`--streams: expected a whole number of streams, got "${v.streams}"`);
    process.stdout.write(`${await sizingTable({ report, modelPath, target: v.target, streams, ctxSize: Number(v["ctx-size"]) })}\n`);
    return;
  }
  if (command === "micro") {
    const [what, ...more] = rest;
    if (!MICRO_COMMANDS.includes(what as MicroCommand)) throw new BenchError(`micro: expected one of ${MICRO_COMMANDS.join(", ")}`);
    const { values: v } = parseArgs({ args: more, options: { rounds: { type: "string", default: "5" }, "engine-build": { type: "string", default: "auto" } } });
    const engineBuild = v["engine-build"] as EngineBinary;
    if (!ENGINE_BINARIES.includes(engineBuild)) throw new BenchError(`--engine-build: ${ENGINE_BINARIES.join(", ")}; got "${engineBuild}"`);
    const w2Path = what === "flash-attention" || what === "step-thread" || what === "sampler" ? await synthesize("25m", "q8_0", 1, undefined, undefined) : undefined;
    process.stdout.write(`${await micro(what as MicroCommand, Number(v.rounds), { w2Path, engineBuild })}\n`);
    return;
  }
  if (command === "synth") {
    const { values: v } = parseArgs({
      args: rest,
      options: { preset: { type: "string", default: "25m" }, weights: { type: "string", default: "q8_0" }, seed: { type: "string", default: "1" }, "tokenizer-from": { type: "string" }, out: { type: "string" } },
    });
    const out = await synthesize(String(v.preset), v.weights as WeightType, Number(v.seed), v["tokenizer-from"], v.out);
    process.stdout.write(`${out}\n`);
    return;
  }
  if (command === "w1" || command === "w2" || command === "w3" || command === "engine") {
    const w3 = command === "w3";
    const { values: v } = parseArgs({
      args: rest,
      options: {
        ...commonOptions,
        // W3 is compute-bound: short outputs at low concurrency.
        ...(w3 ? { concurrency: { type: "string", default: "1,4" }, "max-tokens": { type: "string", default: "32" } } : {}),
        threads: { type: "string", default: "1" },
        "llama-server": { type: "string" },
        "no-llama-server": { type: "boolean", default: false },
        "model-path": { type: "string" },
        weights: { type: "string", default: "q8_0" },
        // W3's 0.6-1.2 GB of weights are read into memory on every side: where the OS drops cached
        // file pages (these VMs do), mapped weights fault back in from disk mid-generation (README, W3).
        mmap: { type: "string", default: w3 ? "off" : "on" },
        spindle: { type: "string", multiple: true },
      },
    });
    if (v.mmap !== "on" && v.mmap !== "off") throw new BenchError(`--mmap: on or off, got "${v.mmap}"`);
    const mmap = v.mmap === "on";
    // Both servers name it --no-mmap.
    const weightArgs = mmap ? [] : ["--no-mmap"];
    const variants = (v.spindle ?? ["spindle="]).map((x) => {
      const eq = x.indexOf("=");
      if (eq <= 0) throw new BenchError(`--spindle: NAME=ARGS, got "${x}"`);
      return { name: x.slice(0, eq), args: x.slice(eq + 1).split(/\s+/).filter((a) => a !== "") };
    });
    if (!["q8_0", "q4_0"].includes(String(v.weights))) throw new BenchError(`--weights: q8_0 or q4_0, got "${v.weights}"`);
    // W2: W1's workload on the ~25M-parameter synthetic model; W3: on Llama 3.2 1B's shape (both generated once into the scratch folder).
    const modelPath = resolve(
      v["model-path"] ??
        (command === "w2"
          ? await synthesize("25m", "q8_0", 1, undefined, undefined)
          : w3
            ? await synthesize("llama-1b", v.weights as WeightType, 1, undefined, undefined)
            : join(ROOT, "..", "shared", "models", "stories260K.gguf")),
    );
    const threads = Number(v.threads);
    const w = workloadFrom(v, "stories260K");
    const ctxSize = 512;
    // W1: 8 slots, 16 for c=16.
    const slotsFor = (c: number) => Math.max(8, c);
    const ceiling = async (c: number, round: number): Promise<RunResult> => {
      const [r] = await engineCeiling({ modelPath, prompt: w.prompt, maxTokens: w.maxTokens, concurrency: c, parallel: slotsFor(c), ctxSize, threads, rounds: 1, mmap });
      const metrics = summarize([], r!.durationS);
      metrics.completed = c;
      metrics.outputThroughput = r!.outputThroughput;
      metrics.totalOutputTokens = r!.outputTokens;
      metrics.ttftMs = { mean: NaN, median: r!.ttftMsMedian, p90: NaN, p99: NaN };
      return { target: "engine", round, concurrency: c, rate: undefined, metrics, server: { stepFullness: r!.stepFullness, tokensPerStep: undefined } };
    };
    if (command === "engine") {
      const results: RunResult[] = [];
      for (const c of String(v.concurrency).split(",").map(Number)) for (let i = 0; i < Number(v.rounds); i++) results.push(await ceiling(c, i));
      process.stdout.write(`${report(results, ["engine"])}\n`);
      return;
    }
    let llamaBin = v["llama-server"];
    if (!llamaBin && !v["no-llama-server"]) {
      llamaBin = execFileSync("bash", [join(ROOT, "bench", "build-llama-server.sh")], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] }).trim();
    }
    const names = [...variants.map((x) => x.name), ...(llamaBin ? ["llama-server"] : []), "engine"];
    const engines: Record<string, string> = {};
    const results = await sideBySide(
      async (c) => {
        const procs: ServerProcess[] = [];
        for (const x of variants) {
          const p = await startSpindle({ modelPath, id: "stories260K", parallel: slotsFor(c), ctxSize, threads, extraArgs: [...weightArgs, ...x.args] });
          p.name = x.name;
          engines[p.name] = `${await engineBuildOf(p.url)}${x.args.length > 0 ? ` (${x.args.join(" ")})` : ""}`;
          procs.push(p);
        }
        if (llamaBin) {
          procs.push(await startLlamaServer({ binary: llamaBin, modelPath, id: "stories260K", parallel: slotsFor(c), ctxSize, threads, extraArgs: weightArgs }));
          engines["llama-server"] = "llama.cpp built here with GGML_NATIVE (bench/build-llama-server.sh), flash attention at its default (auto: on for CPU)";
        }
        return { targets: procs.map((p) => ({ name: p.name, url: p.url })), stop: async () => void (await Promise.all(procs.map((p) => p.stop()))) };
      },
      w,
      v,
      ceiling,
    );
    engines.engine = await ceilingBuild();
    const md = `${report(results, names)}\n\nBinaries: ${Object.entries(engines).map(([k, e]) => `${k}: ${e}`).join("; ")}.`;
    const header = `${command === "w2" ? `W2: synthetic 25m (${modelPath.split("/").pop()})` : w3 ? `W3: synthetic llama-1b (${modelPath.split("/").pop()})` : "W1: stories260K"}, chat "${w.prompt}", max_tokens ${w.maxTokens}, temperature ${w.temperature}, streaming with usage, ${threads} thread(s), ${v.rounds} rounds (medians), slots max(8, c), ctx ${ctxSize}/slot, weights ${mmap ? "mapped" : "read into memory (--no-mmap)"}`;
    process.stdout.write(`${header}\n\n${md}\n`);
    await writeOutputs(String(v.out), `${command}-${Date.now()}`, { workload: w, threads, modelPath, mmap, engines, variants, results }, `# ${header}\n\n${md}\n`, command.toUpperCase());
    return;
  }
}

try {
  await main();
} catch (err) {
  // Options node's parser refused, our own checks, an unreachable target: one line, no stack.
  const e = err as Error & { code?: string };
  const known = err instanceof BenchError || e.code?.startsWith("ERR_PARSE_ARGS") === true;
  process.stderr.write(`bench: ${e.message.replace(/^TypeError \[[A-Z_]+\]: /, "")}\n`);
  if (!known && process.env.SPINDLE_BENCH_DEBUG) process.stderr.write(`${e.stack}\n`);
  process.exit(2);
}
