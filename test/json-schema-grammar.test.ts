/**
 * The JSON-schema grammar builder, checked by llama.cpp's own grammar engine: every
 * integer near the bounds is accepted exactly when it is in range, numbers between whole
 * bounds likewise, objects accept their required and optional properties in order, and
 * keywords the builder cannot honour are refused by name.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { getLlama, LlamaGrammar, LlamaLogLevel, type Llama } from "node-llama-cpp";
import { integerRange, SchemaGrammar, UnsupportedSchemaError } from "../src/generation/json-schema-grammar.js";

let llama: Llama;
beforeAll(async () => {
  llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
});
afterAll(async () => llama?.dispose());

/** Whether llama.cpp's grammar engine accepts the whole text (a test-only hook of node-llama-cpp). */
function accepts(gbnf: string): (text: string) => boolean {
  const g = new LlamaGrammar(llama, { grammar: gbnf }) as unknown as { _testText(t: string): boolean };
  return (t) => g._testText(t);
}

describe("integer ranges", () => {
  it.each([
    [10, 20], [-5, 7], [0, 100], [-123, -4], [3, 3], [0, 9], [17, 1234], [undefined, 50], [-20, undefined], [5, undefined], [undefined, -3], [0, undefined], [99, 101], [-1000, 1000],
  ] as Array<[number | undefined, number | undefined]>)("[%s, %s]: every integer from -1500 to 1500 is accepted exactly when in range, no leading zeros", (lo, hi) => {
    const ok = accepts(`root ::= ${integerRange(lo, hi)}\n`);
    for (let x = -1500; x <= 1500; x++) {
      const want = (lo === undefined || x >= lo) && (hi === undefined || x <= hi);
      if (ok(String(x)) !== want) throw new Error(`${x}: expected ${want}`);
    }
    expect(ok("007")).toBe(false);
  });
});

describe("schemas", () => {
  it("numbers between whole bounds, inclusive and exclusive", () => {
    const cases: Array<[Record<string, unknown>, (x: number) => boolean]> = [
      [{ type: "number", minimum: 0, maximum: 1 }, (x) => x >= 0 && x <= 1],
      [{ type: "number", minimum: -2, maximum: 3 }, (x) => x >= -2 && x <= 3],
      [{ type: "number", exclusiveMinimum: 0, maximum: 10 }, (x) => x > 0 && x <= 10],
      [{ type: "number", minimum: -10, exclusiveMaximum: -2 }, (x) => x >= -10 && x < -2],
      [{ type: "number", minimum: 5 }, (x) => x >= 5],
      [{ type: "number", maximum: -1 }, (x) => x <= -1],
    ];
    const samples = [-12, -10.5, -10, -9.99, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.25, 0.5, 1, 1.5, 2, 2.999, 3, 3.01, 5, 5.5, 9.9, 10, 10.1, 100];
    for (const [schema, inRange] of cases) {
      const ok = accepts(SchemaGrammar.compile(schema).gbnf);
      for (const x of samples) expect(ok(String(x)), `${JSON.stringify(schema)} ${x}`).toBe(inRange(x));
    }
  });

  it("objects: required properties in order, any subset of the optional ones after them; arrays within their bounds; enums", () => {
    const ok = accepts(
      SchemaGrammar.compile({
        type: "object",
        properties: { a: { type: "string", enum: ["x", "y"] }, b: { type: "integer", minimum: 1, maximum: 5 }, c: { type: "array", items: { type: "boolean" }, minItems: 1, maxItems: 2 }, d: { type: "string", maxLength: 3 } },
        required: ["a", "b"],
        additionalProperties: false,
      }).gbnf,
    );
    for (const t of ['{"a":"x","b":3}', '{"a": "y", "b": 5, "c": [true]}', '{"a":"x","b":3,"d":"hi"}', '{"a":"x","b":3,"c":[true,false],"d":"q"}']) expect(ok(t), t).toBe(true);
    for (const t of ['{"a":"z","b":3}', '{"a":"x","b":7}', '{"b":3,"a":"x"}', '{"a":"x","b":3,"c":[]}', '{"a":"x","b":3,"c":[true,true,true]}', '{"a":"x","b":3,"d":"long"}', '{"a":"x"}']) {
      expect(ok(t), t).toBe(false);
    }
    const none = accepts(SchemaGrammar.compile({ type: "object", properties: { p: { type: "integer" }, q: { type: "boolean" } } }).gbnf);
    for (const t of ["{}", '{"p":1}', '{"q":true}', '{"p":1,"q":false}']) expect(none(t), t).toBe(true);
  });

  it("$ref, anyOf, nullable, const, formats, and lists of types", () => {
    const ok = accepts(
      SchemaGrammar.compile({
        $defs: { id: { type: "string", format: "uuid" } },
        type: "object",
        properties: { id: { $ref: "#/$defs/id" }, v: { anyOf: [{ type: "integer" }, { const: "none" }] }, n: { type: "string", nullable: true }, t: { type: ["boolean", "null"] }, d: { type: "string", format: "date" } },
        required: ["id", "v", "n", "t", "d"],
      }).gbnf,
    );
    expect(ok('{"id":"123e4567-e89b-12d3-a456-426614174000","v":"none","n":null,"t":false,"d":"2026-11-29"}')).toBe(true);
    expect(ok('{"id":"nope","v":1,"n":"x","t":null,"d":"2026-11-29"}')).toBe(false);
  });

  it.each([
    [{ type: "string", pattern: "^a" }, "pattern"],
    [{ type: "number", multipleOf: 2 }, "multipleOf"],
    [{ allOf: [{ type: "string" }] }, "allOf"],
    [{ type: "object", properties: { x: { not: { type: "null" } } } }, "not"],
    [{ type: "number", minimum: 0.5 }, "minimum (a fractional bound)"],
    [{ type: "string", format: "email" }, 'format "email"'],
  ])("refuses %j naming '%s'", (schema, keyword) => {
    expect(() => SchemaGrammar.compile(schema)).toThrow(UnsupportedSchemaError);
    expect(() => SchemaGrammar.compile(schema)).toThrow(`'${keyword}'`);
  });
});
