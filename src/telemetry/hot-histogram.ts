/**
 * A Prometheus histogram for the per-token path. prom-client's observe() allocates a
 * label object and hashes the labels on every call; this one is bound to its labels
 * once, so an observation is a bucket search and three increments, nothing allocated
 * (`npm run bench -- micro histogram` compares the two).
 * It registers with a prom-client Registry as a custom metric (get() in prom-client's
 * metric-object format), so the scrape is the same text format.
 */
import type { Registry } from "prom-client";

interface Series {
  labels: Record<string, string>;
  counts: Float64Array;
  sum: number;
  count: number;
}

export interface HotObserver {
  observe(value: number): void;
}

export class HotHistogram {
  private readonly series: Series[] = [];

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly buckets: readonly number[],
    registry: Registry,
  ) {
    registry.registerMetric(this as never);
  }

  /** A child bound to these labels, for the hot path. */
  child(labels: Record<string, string>): HotObserver {
    const s: Series = { labels, counts: new Float64Array(this.buckets.length), sum: 0, count: 0 };
    this.series.push(s);
    const bounds = this.buckets;
    return {
      observe(value: number) {
        // Buckets are few (≤ 16): a linear scan beats a binary search here.
        for (let i = 0; i < bounds.length; i++) {
          if (value <= bounds[i]!) {
            s.counts[i]!++;
            break;
          }
        }
        s.sum += value;
        s.count++;
      },
    };
  }

  /** prom-client's metric interface: cumulative buckets, +Inf, sum and count per series. */
  get() {
    const values: Array<{ metricName: string; labels: Record<string, string | number>; value: number }> = [];
    for (const s of this.series) {
      let cumulative = 0;
      for (let i = 0; i < this.buckets.length; i++) {
        cumulative += s.counts[i]!;
        values.push({ metricName: `${this.name}_bucket`, labels: { le: this.buckets[i]!, ...s.labels }, value: cumulative });
      }
      values.push({ metricName: `${this.name}_bucket`, labels: { le: "+Inf", ...s.labels }, value: s.count });
      values.push({ metricName: `${this.name}_sum`, labels: s.labels, value: s.sum });
      values.push({ metricName: `${this.name}_count`, labels: s.labels, value: s.count });
    }
    return { name: this.name, help: this.help, type: "histogram", values, aggregator: "sum" };
  }

  reset(): void {
    for (const s of this.series) {
      s.counts.fill(0);
      s.sum = 0;
      s.count = 0;
    }
  }
}
