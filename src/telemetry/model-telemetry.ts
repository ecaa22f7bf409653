/** Model lifecycle events as metrics and as root spans of their own (load, warm-up, failure). */
import { SpanStatusCode } from "@opentelemetry/api";
import type { EvictionReason, ModelEvents, SchedulerObserver } from "../observers.js";
import type { Metrics } from "./metrics.js";
import { wallClock, type Tracing } from "./tracing.js";

export class ModelTelemetry implements ModelEvents {
  constructor(
    private readonly metrics: Metrics,
    private readonly tracing: Tracing | undefined,
  ) {}

  schedulerObserver(model: string, version: string): SchedulerObserver | undefined {
    return this.metrics.schedulerObserver(model, version);
  }

  loaded(model: string, version: string, t: { loadStart: number; loadEnd: number; warmupEnd: number }): void {
    this.metrics.modelLoaded(model, version, (t.loadEnd - t.loadStart) / 1000, (t.warmupEnd - t.loadEnd) / 1000);
    const attrs = { "gen_ai.request.model": model, "spindle.model.version": version };
    this.span("model.load", t.loadStart, t.loadEnd, attrs);
    this.span("model.warmup", t.loadEnd, t.warmupEnd, attrs);
  }

  loadFailed(model: string, version: string, t: { start: number; end: number }, reason: string): void {
    this.metrics.modelLoadFailed(model, version);
    this.span("model.load", t.start, t.end, { "gen_ai.request.model": model, "spindle.model.version": version }, reason);
  }

  evicted(model: string, version: string, reason: EvictionReason): void {
    this.metrics.modelEvicted(model, version, reason);
  }

  shadow(model: string, version: string, outcome: string): void {
    this.metrics.shadowRequest(model, version, outcome);
  }

  repositoryChange(name: string, action: string): void {
    this.metrics.repositoryChange(name, action);
  }

  /** A lifecycle event as a root span of its own. */
  private span(name: string, start: number, end: number, attributes: Record<string, string>, error?: string): void {
    const tracer = this.tracing?.tracer;
    if (!tracer) return;
    const span = tracer.startSpan(name, { startTime: wallClock(start), attributes, root: true });
    if (error) span.setStatus({ code: SpanStatusCode.ERROR, message: error });
    span.end(wallClock(end));
  }
}
