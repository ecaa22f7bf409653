/**
 * The server's own view of a run, from its Prometheus `/metrics` scraped before and
 * after: Spindle's series, vLLM's (`vllm:`) and llama-server's (`llamacpp:`, with its
 * --metrics flag). Whatever the target exposes is reported beside the client's figures.
 */
export interface ServerMetricsView {
  source: "spindle" | "vllm" | "llamacpp";
  generatedTokens: number | undefined;
  requests: number | undefined;
  meanTtftMs: number | undefined;
  meanQueueMs: number | undefined;
}

type Scrape = Map<string, number>;

export async function scrapeMetrics(baseUrl: string): Promise<Scrape | undefined> {
  try {
    const res = await fetch(`${baseUrl.replace(/\/$/, "")}/metrics`, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) return undefined;
    const text = await res.text();
    const out: Scrape = new Map();
    for (const line of text.split("\n")) {
      if (line === "" || line.startsWith("#")) continue;
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)/.exec(line);
      // Sum over label sets: the run's totals across models and endpoints.
      if (m) out.set(m[1]!, (out.get(m[1]!) ?? 0) + Number(m[2]));
    }
    return out;
  } catch {
    return undefined;
  }
}

const SOURCES = [
  { source: "spindle", tokens: "spindle_completion_tokens_total", requests: "spindle_requests_total", ttft: "spindle_time_to_first_token_seconds", queue: "spindle_queue_wait_seconds" },
  { source: "vllm", tokens: "vllm:generation_tokens_total", requests: "vllm:request_success_total", ttft: "vllm:time_to_first_token_seconds", queue: "vllm:request_queue_time_seconds" },
  { source: "llamacpp", tokens: "llamacpp:tokens_predicted_total", requests: "llamacpp:requests_processing", ttft: undefined, queue: undefined },
] as const;

export function serverView(before: Scrape | undefined, after: Scrape | undefined): ServerMetricsView | undefined {
  if (!before || !after) return undefined;
  const delta = (name: string | undefined) => (name !== undefined && after.has(name) ? after.get(name)! - (before.get(name) ?? 0) : undefined);
  const mean = (base: string | undefined) => {
    if (base === undefined) return undefined;
    const s = delta(`${base}_sum`);
    const c = delta(`${base}_count`);
    return s !== undefined && c ? (s / c) * 1000 : undefined;
  };
  for (const src of SOURCES) {
    if (!after.has(src.tokens)) continue;
    return {
      source: src.source,
      generatedTokens: delta(src.tokens),
      requests: src.source === "llamacpp" ? undefined : delta(src.requests),
      meanTtftMs: mean(src.ttft),
      meanQueueMs: mean(src.queue),
    };
  }
  return undefined;
}

/** Which llama.cpp binary a Spindle target runs, from its spindle_build_info labels. */
export async function engineBuildOf(baseUrl: string): Promise<string> {
  try {
    const text = await (await fetch(`${baseUrl.replace(/\/$/, "")}/metrics`, { signal: AbortSignal.timeout(5000) })).text();
    const line = text.split("\n").find((l) => l.startsWith("spindle_build_info{"));
    const label = (k: string) => (line ? new RegExp(`${k}="([^"]*)"`).exec(line)?.[1] : undefined);
    return line ? `node-llama-cpp ${label("node_llama_cpp_version")} ${label("engine_build")} binary, ggml CPU variant ${label("cpu_variant")}` : "unknown";
  } catch {
    return "unknown";
  }
}
