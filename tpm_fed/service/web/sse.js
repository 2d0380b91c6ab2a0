// Server-sent events as OpenAI streams them: `data: {json}` events separated
// by a blank line, ending with `data: [DONE]`. Each chunk is handed over as
// soon as its event is complete, so the page shows tokens as they arrive.

export async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // a comment or keep-alive line
      if (data === "[DONE]") {
        await reader.cancel();
        return;
      }
      yield JSON.parse(data);
    }
  }
}
