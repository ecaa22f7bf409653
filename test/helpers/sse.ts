import { EventSourceParserStream } from "eventsource-parser/stream";

export interface RawStream {
  status: number;
  headers: Headers;
  /** The data field of every event, in order, [DONE] included. */
  events: string[];
}

/** Posts and reads the raw SSE stream with a real SSE parser, so the wire format itself is checked. */
export async function postSse(url: string, body: unknown, headers: Record<string, string> = {}): Promise<RawStream> {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });
  const events: string[] = [];
  if (res.body && (res.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
    const reader = res.body.pipeThrough(new TextDecoderStream()).pipeThrough(new EventSourceParserStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      events.push(value.data);
    }
  } else {
    events.push(await res.text());
  }
  return { status: res.status, headers: res.headers, events };
}
