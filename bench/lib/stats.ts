/** vLLM `bench serve` metric definitions, so our figures compare with theirs. */
import type { RequestRecord } from "./stream-client.js";

export interface Distribution {
  mean: number;
  median: number;
  p90: number;
  p99: number;
}

/** numpy.percentile's default (linear interpolation between closest ranks). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = (p / 100) * (sorted.length - 1);
  const lo = Math.floor(rank);
  const hi = Math.ceil(rank);
  return sorted[lo]! + (sorted[hi]! - sorted[lo]!) * (rank - lo);
}

export function distribution(values: readonly number[]): Distribution {
  const sorted = [...values].sort((a, b) => a - b);
  const mean = sorted.length ? sorted.reduce((a, b) => a + b, 0) / sorted.length : NaN;
  return { mean, median: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99) };
}

export interface Slo {
  ttftMs?: number;
  tpotMs?: number;
  e2eMs?: number;
}

export interface RunMetrics {
  completed: number;
  failed: number;
  failedByType: Record<string, number>;
  /** Requests sent a second time after their connection closed under them (stream-client.ts), whatever their outcome. */
  resent: number;
  durationS: number;
  requestThroughput: number;
  outputThroughput: number;
  totalTokenThroughput: number;
  totalInputTokens: number;
  totalOutputTokens: number;
  /** Milliseconds. */
  ttftMs: Distribution;
  tpotMs: Distribution;
  itlMs: Distribution;
  e2eMs: Distribution;
  goodput: number | undefined;
}

/** TPOT = (latency − TTFT) / (output tokens − 1), over requests with more than one token. */
export function tpot(r: RequestRecord): number | undefined {
  return r.outputTokens > 1 ? (r.latency - r.ttft) / (r.outputTokens - 1) : undefined;
}

export function summarize(records: readonly RequestRecord[], durationS: number, slo?: Slo): RunMetrics {
  const ok = records.filter((r) => r.ok);
  const failedByType: Record<string, number> = {};
  for (const r of records) if (!r.ok) failedByType[r.errorType ?? "unknown"] = (failedByType[r.errorType ?? "unknown"] ?? 0) + 1;
  const ms = (xs: number[]) => xs.map((x) => x * 1000);
  const tpots = ok.map(tpot).filter((x): x is number => x !== undefined);
  const input = ok.reduce((a, r) => a + r.promptTokens, 0);
  const output = ok.reduce((a, r) => a + r.outputTokens, 0);
  let goodput: number | undefined;
  if (slo && (slo.ttftMs !== undefined || slo.tpotMs !== undefined || slo.e2eMs !== undefined)) {
    const good = ok.filter((r) => {
      const t = tpot(r);
      return (
        (slo.ttftMs === undefined || r.ttft * 1000 <= slo.ttftMs) &&
        (slo.tpotMs === undefined || t === undefined || t * 1000 <= slo.tpotMs) &&
        (slo.e2eMs === undefined || r.latency * 1000 <= slo.e2eMs)
      );
    }).length;
    goodput = good / durationS;
  }
  return {
    completed: ok.length,
    failed: records.length - ok.length,
    failedByType,
    resent: records.filter((r) => r.resent).length,
    durationS,
    requestThroughput: ok.length / durationS,
    outputThroughput: output / durationS,
    totalTokenThroughput: (input + output) / durationS,
    totalInputTokens: input,
    totalOutputTokens: output,
    ttftMs: distribution(ms(ok.map((r) => r.ttft))),
    tpotMs: distribution(ms(tpots)),
    itlMs: distribution(ms(ok.flatMap((r) => r.itl))),
    e2eMs: distribution(ms(ok.map((r) => r.latency))),
    goodput,
  };
}

export function parseSlo(text: string | undefined): Slo | undefined {
  if (!text) return undefined;
  const slo: Slo = {};
  for (const part of text.split(",")) {
    const m = /^(ttft|tpot|e2e)=(\d+(?:\.\d+)?)ms$/.exec(part.trim());
    if (!m) throw new Error(`bad --slo entry "${part}": expected ttft=…ms, tpot=…ms or e2e=…ms`);
    slo[`${m[1] as "ttft" | "tpot" | "e2e"}Ms`] = Number(m[2]);
  }
  return slo;
}
