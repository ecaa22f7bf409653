/**
 * What is known about one request, reported once when it ends: one metrics update, one
 * log line, one trace (the request span and its model-wait, queue, prefill and decode
 * children). Fed by the generation service through the RequestObserver contract; it
 * reads only the record it is given.
 */
import { SpanKind, SpanStatusCode, type Span } from "@opentelemetry/api";
import type { Logger } from "../log.js";
import type { RequestObservation, RequestObserver, RequestRecord, RequestStart } from "../observers.js";
import type { Metrics } from "./metrics.js";
import { incomingContext, pastSpan, wallClock, type Tracing } from "./tracing.js";

const OPERATIONS: Record<RequestRecord["endpoint"], string> = {
  chat: "chat",
  completions: "text_completion",
  responses: "chat",
  messages: "chat",
  embeddings: "embeddings",
};

const round = (ms: number) => Math.round(ms * 10) / 10;

export class RequestTelemetry implements RequestObserver {
  constructor(
    private readonly metrics: Metrics,
    private readonly tracing: Tracing | undefined,
    private readonly log: Logger,
  ) {}

  start(info: RequestStart): RequestObservation {
    const span = this.tracing?.tracer.startSpan(
      `${info.transport === "ws" ? "WS" : "POST"} ${info.endpoint}`,
      {
        kind: info.transport === "ws" ? SpanKind.INTERNAL : SpanKind.SERVER,
        startTime: wallClock(performance.now()),
        attributes: { "spindle.request_id": info.id, "spindle.transport": info.transport },
      },
      incomingContext(info.headers),
    );
    let finished = false;
    return {
      traceId: span?.spanContext().traceId,
      finish: (record) => {
        if (finished) return;
        finished = true;
        this.metrics.requestFinished(record);
        this.logLine(record, span?.spanContext().traceId);
        if (span) this.endSpans(span, record);
      },
    };
  }

  /** One line per request; never the prompt or the output. */
  private logLine(r: RequestRecord, traceId: string | undefined): void {
    const tl = r.timeline;
    const queueMs = tl?.queuedAt !== undefined && tl.startedAt !== undefined ? round(tl.startedAt - tl.queuedAt) : null;
    const ttftMs = tl?.firstTokenAt !== undefined ? round(tl.firstTokenAt - r.start) : null;
    this.log.info(
      {
        reqId: r.id,
        endpoint: r.endpoint,
        transport: r.transport,
        model: r.model ? `${r.model.id}@${r.model.version}` : "_unknown@_unknown",
        route: r.route ?? null,
        ...(r.key !== undefined ? { key: r.key } : {}),
        status: r.status,
        finish_reason: r.finishReason ?? null,
        error_type: r.error?.kind ?? null,
        error_code: r.error?.code ?? null,
        ...(r.error?.cause ? { error_cause: r.error.cause } : {}),
        prompt_tokens: r.usage?.promptTokens ?? null,
        cached_tokens: r.usage?.cachedTokens ?? null,
        completion_tokens: r.usage?.completionTokens ?? null,
        queue_ms: queueMs,
        // Cutting the slot's KV back to the shared prefix waits for the step in flight (README, W3).
        kv_trim_ms: tl?.trimmedAt !== undefined && tl.startedAt !== undefined ? round(tl.trimmedAt - tl.startedAt) : null,
        ttft_ms: ttftMs,
        total_ms: round(r.end - r.start),
        // Only when the request had to wait for its model version to load.
        ...(r.modelWait ? { model_wait_ms: round(r.modelWait.end - r.modelWait.start) } : {}),
        ...(traceId ? { trace_id: traceId } : {}),
      },
      "request",
    );
  }

  private endSpans(span: Span, r: RequestRecord): void {
    const tracer = this.tracing!.tracer;
    const model = r.model?.id ?? "_unknown";
    const operation = OPERATIONS[r.endpoint];
    const tl = r.timeline;
    const s = r.sampling;
    span.updateName(`${operation} ${model}`);
    span.setAttributes({
      "gen_ai.operation.name": operation,
      "gen_ai.provider.name": "llama.cpp",
      "gen_ai.system": "llama.cpp",
      "gen_ai.request.model": model,
      ...(r.model ? { "gen_ai.response.model": `${r.model.id}@${r.model.version}`, "spindle.model.version": r.model.version } : {}),
      ...(r.route ? { "spindle.route": r.route } : {}),
      "http.response.status_code": r.status,
      ...(s ? { "gen_ai.request.max_tokens": s.maxTokens, "gen_ai.request.temperature": s.temperature, "gen_ai.request.top_p": s.topP, "gen_ai.request.seed": s.seed } : {}),
      ...(r.responseId ? { "gen_ai.response.id": r.responseId } : {}),
      ...(r.usage ? { "gen_ai.usage.input_tokens": r.usage.promptTokens, "gen_ai.usage.output_tokens": r.usage.completionTokens, "spindle.cached_tokens": r.usage.cachedTokens } : {}),
      ...(r.finishReason ? { "gen_ai.response.finish_reasons": [r.finishReason] } : {}),
      ...(tl?.slot !== undefined ? { "spindle.slot": tl.slot } : {}),
      ...(tl?.firstTokenAt !== undefined ? { "spindle.ttft_ms": round(tl.firstTokenAt - r.start) } : {}),
    });
    const error = r.error;
    if (error) {
      span.setAttribute("error.type", error.kind);
      span.setStatus({ code: SpanStatusCode.ERROR, message: error.message });
    }
    // Children carry only what is theirs; the model and request attributes are on the parent.
    if (r.modelWait) pastSpan(tracer, span, "model.wait", r.modelWait.start, r.modelWait.end, {});
    if (tl?.queuedAt !== undefined) {
      const queueEnd = tl.startedAt ?? tl.endedAt ?? r.end;
      pastSpan(tracer, span, "queue", tl.queuedAt, queueEnd, {}, tl.startedAt === undefined ? error?.kind : undefined);
    }
    if (tl?.startedAt !== undefined) {
      const decodeFrom = tl.firstTokenAt ?? tl.endedAt ?? r.end;
      pastSpan(tracer, span, "prefill", tl.startedAt, decodeFrom, {
        "gen_ai.usage.input_tokens": s?.promptTokens ?? 0,
        "spindle.cached_tokens": tl.cachedTokens ?? 0,
        "spindle.slot": tl.slot ?? -1,
      });
      if (tl.firstTokenAt !== undefined) {
        pastSpan(tracer, span, "decode", tl.firstTokenAt, tl.endedAt ?? r.end, { "gen_ai.usage.output_tokens": r.usage?.completionTokens ?? 0 }, error?.kind);
      }
    }
    span.end(wallClock(r.end));
  }
}
