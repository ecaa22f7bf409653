/**
 * A sizing table from a benchmark's figures: what one replica delivers at each number
 * of concurrent streams (aggregate and per-stream output tok/s, TTFT; medians over the
 * report's rounds), what its model takes in memory at that many slots (the engine's own
 * estimate, the one the memory budget uses), and how many replicas — and how much
 * memory — a given number of streams needs at that operating point. docs/scaling.md
 * quotes it; `npm run bench -- sizing` reproduces it from the newest W2 (or W1) report.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Engine } from "../src/engine/engine.js";

interface ReportRun {
  target: string;
  concurrency: number;
  metrics: { outputThroughput: number; completed: number; failed: number; ttftMs: { median: number }; tpotMs: { median: number } };
}

export interface SizingOptions {
  report: string;
  modelPath: string;
  /** Default: the report's first target. */
  target: string | undefined;
  streams: number;
  ctxSize: number;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const mib = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;
const gib = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(1)} GiB` : mib(b));

/** The newest w2-*.json (else w1-*.json) in the results folder. */
export function newestReport(dir: string): string | undefined {
  if (!existsSync(dir)) return undefined;
  for (const prefix of ["w2-", "w1-"]) {
    const files = readdirSync(dir).filter((f) => f.startsWith(prefix) && f.endsWith(".json")).sort();
    if (files.length > 0) return join(dir, files.at(-1)!);
  }
  return undefined;
}

export async function sizingTable(opts: SizingOptions): Promise<string> {
  const all = (JSON.parse(readFileSync(opts.report, "utf8")) as { results: ReportRun[] }).results;
  // Without --target: the report's first target (its first Spindle variant; ratios were against it).
  const target = opts.target ?? all[0]?.target ?? "spindle";
  const runs = all.filter((r) => r.target === target);
  if (runs.length === 0) throw new Error(`${opts.report} has no runs of target "${target}"`);
  const levels = [...new Set(runs.map((r) => r.concurrency))].sort((a, b) => a - b);
  const engine = await Engine.create("cpu");
  const rows: string[] = [];
  try {
    for (const c of levels) {
      const at = runs.filter((r) => r.concurrency === c);
      const out = median(at.map((r) => r.metrics.outputThroughput));
      const perStream = median(at.map((r) => 1000 / r.metrics.tpotMs.median));
      const ttft = median(at.map((r) => r.metrics.ttftMs.median));
      // The benchmark ran max(8, c) slots; a replica sized for c streams holds c slots.
      const mem = await engine.estimate({ id: "sizing", path: opts.modelPath, ctxSize: opts.ctxSize, parallel: c });
      const replicas = Math.ceil(opts.streams / c);
      rows.push(`| ${c} | ${out.toFixed(0)} | ${perStream.toFixed(0)} | ${ttft.toFixed(1)} | ${mib(mem.ram)} | ${replicas} | ${gib(replicas * mem.ram)} |`);
    }
  } finally {
    await engine.llama.dispose();
  }
  return [
    `Sizing from ${opts.report.split("/").pop()} (target ${target}; medians over its rounds), model ${opts.modelPath.split("/").pop()}, ${opts.ctxSize} tokens per slot, for ${opts.streams} concurrent streams:`,
    "",
    `| streams per replica | out tok/s per replica | tok/s per stream | TTFT ms | model memory per replica | replicas for ${opts.streams} | model memory for ${opts.streams} |`,
    "|---|---|---|---|---|---|---|",
    ...rows,
  ].join("\n");
}
