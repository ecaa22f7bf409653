/** Charts of a benchmark (throughput and TTFT against concurrency, a line per target) as SVG, drawn by Vega-Lite. */
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";

export interface ChartPoint {
  target: string;
  concurrency: number;
  outputTokensPerSecond: number;
  ttftMs: number;
}

function panel(title: string, field: keyof ChartPoint, axis: string) {
  return {
    title,
    width: 360,
    height: 240,
    mark: { type: "line" as const, point: true },
    encoding: {
      x: { field: "concurrency", type: "quantitative" as const, title: "concurrency", scale: { type: "log" as const, base: 2 } },
      y: { field, type: "quantitative" as const, title: axis },
      color: { field: "target", type: "nominal" as const, title: "target" },
    },
  };
}

export async function renderChart(points: ChartPoint[], title: string): Promise<string> {
  const spec: TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    title,
    data: { values: points },
    hconcat: [panel("Output throughput", "outputTokensPerSecond", "output tokens/s (median)"), panel("Time to first token", "ttftMs", "TTFT ms (median)")],
  };
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" });
  return view.toSVG();
}
