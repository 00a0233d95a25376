// The Vercel AI SDK's documented multi-turn conversation: each turn's messages are kept with
// messages.push(...result.response.messages). `store` is left at its default (true), so from
// the second turn on the SDK sends earlier output as item_reference items.
// Usage: node ai_sdk_conversation.mjs http://127.0.0.1:PORT/v1 [turns]
import { createOpenAI } from '@ai-sdk/openai';
import { generateText } from 'ai';

const openai = createOpenAI({ baseURL: process.argv[2], apiKey: 'sk-local' });
const turns = Number(process.argv[3] ?? 3);
const messages = [];
for (let turn = 1; turn <= turns; turn++) {
  messages.push({ role: 'user', content: `question ${turn}` });
  const result = await generateText({ model: openai.responses('gpt-5.1-codex'), messages });
  messages.push(...result.response.messages);
  console.log(JSON.stringify({ turn, text: result.text, id: result.response.id }));
}
