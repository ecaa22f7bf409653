/**
 * What is known about one request, gathered as it goes and reported once when it ends:
 * one metrics update, one log line, one trace (the request span and its queue, prefill
 * and decode children). Shared by every transport.
 */
import { SpanKind, SpanStatusCode, type Span } from "@opentelemetry/api";
import type { FastifyBaseLogger } from "fastify";
import type { ApiError } from "../errors.js";
import type { GenerationOutcome, GenerationRequest, Usage } from "../scheduler/types.js";
import type { PreparedGeneration } from "../service/prepare.js";
import type { Metrics } from "./metrics.js";
import { incomingContext, pastSpan, wallClock, type Tracing } from "./tracing.js";

export interface Telemetry {
  metrics: Metrics;
  tracing: Tracing | undefined;
  log: FastifyBaseLogger;
}

export interface RequestOutcome {
  status: number;
  finishReason?: string;
  usage?: Usage;
  error?: ApiError;
}

/** Notes a generation's outcome on the request's (the status stays the caller's). */
export function noteOutcome(into: RequestOutcome, outcome: GenerationOutcome): void {
  if ("result" in outcome) {
    into.finishReason = outcome.result.finishReason;
    into.usage = outcome.result.usage;
  } else {
    into.error = outcome.error;
    into.usage = outcome.usage;
  }
}

const UNKNOWN_MODEL = "_unknown";

export class RequestTelemetry {
  private readonly start = performance.now();
  private readonly span: Span | undefined;
  private prepared: PreparedGeneration | undefined;
  private transport: string;
  private finished = false;

  constructor(
    private readonly telemetry: Telemetry,
    private readonly info: { id: string; endpoint: "chat" | "completions"; transport: "http" | "ws"; route: string; headers: Record<string, string | string[] | undefined> },
  ) {
    this.transport = info.transport;
    const tracer = telemetry.tracing?.tracer;
    if (tracer) {
      this.span = tracer.startSpan(
        info.route,
        { kind: info.transport === "ws" ? SpanKind.INTERNAL : SpanKind.SERVER, startTime: wallClock(this.start), attributes: { "spindle.request_id": info.id, "spindle.transport": info.transport } },
        incomingContext(info.headers),
      );
    }
  }

  /** The trace id to hand back to the client, when tracing is on. */
  get traceId(): string | undefined {
    return this.span?.spanContext().traceId;
  }

  /** The request was understood: its model, version and parameters are known. */
  prepare(p: PreparedGeneration): void {
    this.prepared = p;
    if (p.stream && this.transport === "http") this.transport = "sse";
  }

  finish(outcome: RequestOutcome): void {
    if (this.finished) return;
    this.finished = true;
    const end = performance.now();
    const p = this.prepared;
    const model = p?.entry.id ?? UNKNOWN_MODEL;
    const version = p?.entry.version ?? UNKNOWN_MODEL;
    const tl = p?.gen.timeline;
    const queueWait = tl?.queuedAt !== undefined && tl.startedAt !== undefined ? (tl.startedAt - tl.queuedAt) / 1000 : undefined;
    const ttft = tl?.firstTokenAt !== undefined ? (tl.firstTokenAt - this.start) / 1000 : undefined;
    this.telemetry.metrics.requestFinished({
      endpoint: this.info.endpoint,
      model,
      version,
      status: outcome.status,
      finishReason: outcome.finishReason,
      errorKind: outcome.error?.kind,
      durationSeconds: (end - this.start) / 1000,
      queueWaitSeconds: queueWait,
      ttftSeconds: ttft,
      promptTokens: outcome.usage?.promptTokens,
      cachedTokens: outcome.usage?.cachedTokens,
      completionTokens: outcome.usage?.completionTokens,
    });
    // One line per request; never the prompt or the output.
    this.telemetry.log.info(
      {
        reqId: this.info.id,
        endpoint: this.info.endpoint,
        transport: this.transport,
        model: `${model}@${version}`,
        route: p?.via ?? null,
        status: outcome.status,
        finish_reason: outcome.finishReason ?? null,
        error_type: outcome.error?.kind ?? null,
        prompt_tokens: outcome.usage?.promptTokens ?? null,
        cached_tokens: outcome.usage?.cachedTokens ?? null,
        completion_tokens: outcome.usage?.completionTokens ?? null,
        queue_ms: queueWait !== undefined ? round(queueWait * 1000) : null,
        ttft_ms: ttft !== undefined ? round(ttft * 1000) : null,
        total_ms: round(end - this.start),
        // Only when the request had to wait for its model version to load.
        ...(p && p.acquire.end - p.acquire.start >= MODEL_WAIT_REPORTED_MS ? { model_wait_ms: round(p.acquire.end - p.acquire.start) } : {}),
        ...(this.traceId ? { trace_id: this.traceId } : {}),
      },
      "request",
    );
    if (this.span) this.endSpans(end, outcome, model, version);
  }

  private endSpans(end: number, outcome: RequestOutcome, model: string, version: string): void {
    const span = this.span!;
    const tracer = this.telemetry.tracing!.tracer;
    const p = this.prepared;
    const gen: GenerationRequest | undefined = p?.gen;
    const tl = gen?.timeline;
    const operation = this.info.endpoint === "chat" ? "chat" : "text_completion";
    const usage = outcome.usage;
    const common = {
      "gen_ai.operation.name": operation,
      "gen_ai.provider.name": "llama.cpp",
      "gen_ai.system": "llama.cpp",
      "gen_ai.request.model": model,
      "gen_ai.response.model": `${model}@${version}`,
      "spindle.model.version": version,
      ...(p ? { "spindle.route": p.via } : {}),
    };
    span.updateName(`${operation} ${model}`);
    span.setAttributes({
      ...common,
      "http.response.status_code": outcome.status,
      ...(gen
        ? {
            "gen_ai.request.max_tokens": gen.maxTokens,
            "gen_ai.request.temperature": gen.sampling.temperature,
            "gen_ai.request.top_p": gen.sampling.topP,
            "gen_ai.request.seed": gen.sampling.seed,
          }
        : {}),
      ...(p ? { "gen_ai.response.id": p.meta.id } : {}),
      ...(usage ? { "gen_ai.usage.input_tokens": usage.promptTokens, "gen_ai.usage.output_tokens": usage.completionTokens, "spindle.cached_tokens": usage.cachedTokens } : {}),
      ...(outcome.finishReason ? { "gen_ai.response.finish_reasons": [outcome.finishReason] } : {}),
      ...(tl?.slot !== undefined ? { "spindle.slot": tl.slot } : {}),
      ...(tl?.firstTokenAt !== undefined ? { "spindle.ttft_ms": round(tl.firstTokenAt - this.start) } : {}),
    });
    const error = outcome.error;
    if (error) {
      span.setAttribute("error.type", error.kind);
      span.setStatus({ code: SpanStatusCode.ERROR, message: error.message });
    }
    // Children carry only what is theirs; the model and request attributes are on the parent.
    if (p && p.acquire.end - p.acquire.start >= MODEL_WAIT_REPORTED_MS) pastSpan(tracer, span, "model.wait", p.acquire.start, p.acquire.end, {});
    if (tl?.queuedAt !== undefined) {
      const queueEnd = tl.startedAt ?? tl.endedAt ?? end;
      pastSpan(tracer, span, "queue", tl.queuedAt, queueEnd, {}, tl.startedAt === undefined ? error?.kind : undefined);
    }
    if (tl?.startedAt !== undefined) {
      const decodeFrom = tl.firstTokenAt ?? tl.endedAt ?? end;
      pastSpan(tracer, span, "prefill", tl.startedAt, decodeFrom, {
        "gen_ai.usage.input_tokens": gen!.promptTokens.length,
        "spindle.cached_tokens": tl.cachedTokens ?? 0,
        "spindle.slot": tl.slot ?? -1,
      });
      if (tl.firstTokenAt !== undefined) {
        pastSpan(tracer, span, "decode", tl.firstTokenAt, tl.endedAt ?? end, { "gen_ai.usage.output_tokens": usage?.completionTokens ?? 0 }, error?.kind);
      }
    }
    span.end(wallClock(end));
  }
}

/** A lifecycle event (load, warm-up) as a root span of its own. */
export function lifecycleSpan(telemetry: Telemetry, name: string, start: number, end: number, attributes: Record<string, string | number>, error?: string): void {
  const tracer = telemetry.tracing?.tracer;
  if (!tracer) return;
  const span = tracer.startSpan(name, { startTime: wallClock(start), attributes, root: true });
  if (error) span.setStatus({ code: SpanStatusCode.ERROR, message: error });
  span.end(wallClock(end));
}

const round = (ms: number) => Math.round(ms * 10) / 10;

/** A lease on a resident version takes microseconds; anything longer was a load or an eviction. */
const MODEL_WAIT_REPORTED_MS = 1;

