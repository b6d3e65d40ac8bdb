// Swagger UI "Try it out" in a real browser (headless Chromium driven by playwright-core)
// against a running mqproxy: produce through the form, then pull it through GET /mq/message.
// Usage: node swagger-try-it-out.mjs http://127.0.0.1:PORT
import { chromium } from 'playwright-core';

const base = process.argv[2];
let passed = 0;
let failed = 0;
function check(name, ok, detail) {
  if (ok) passed++; else failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${ok ? '' : ': ' + detail}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 2000 } });
  await page.goto(`${base}/swagger-ui/`);
  // Swagger UI renders after fetching the spec: wait for the last operation before reading.
  await page.locator('#operations-health-readyz').waitFor({ timeout: 30000 });
  const summaries = await page.locator('.opblock-summary-path').allInnerTexts();
  for (const path of ['/mq/produce', '/mq/produce/batch', '/mq/message', '/mq/ack', '/mq/unlock']) {
    check(`Swagger UI lists ${path}`, summaries.some(s => s.replace(/\u200b/g, '') === path), summaries.join(','));
  }

  const body = `{"id":1,"from":"swagger-ui ${Date.now()}"}`;
  const produce = page.locator('#operations-produce-produce');
  await produce.locator('.opblock-summary').click();
  await produce.getByRole('button', { name: 'Try it out' }).click();
  await produce.locator('[placeholder="producer"]').first().fill('mqcloud-http-test-topic-producer');
  await produce.locator('[placeholder="message"]').first().fill(body);
  await produce.getByRole('button', { name: 'Execute' }).click();
  const produced = produce.locator('.live-responses-table .response-col_description pre').first();
  await produced.waitFor({ timeout: 15000 });
  const p = JSON.parse(await produced.innerText());
  check('Try it out: POST /mq/produce answers status 200', p.status === 200, JSON.stringify(p));

  const fetch = page.locator('#operations-consume-fetch');
  await fetch.locator('.opblock-summary').click();
  await fetch.getByRole('button', { name: 'Try it out' }).click();
  await fetch.locator('tr[data-param-name="topic"] input').fill('mqcloud-http-test-topic');
  await fetch.locator('tr[data-param-name="consumer"] input').fill('http-clustering-consumer');
  await fetch.getByRole('button', { name: 'Execute' }).click();
  const fetched = fetch.locator('.live-responses-table .response-col_description pre').first();
  await fetched.waitFor({ timeout: 15000 });
  const f = JSON.parse(await fetched.innerText());
  const bodies = (f.result?.msgList || []).map(m => m.message);
  check('Try it out: GET /mq/message returns the produced message', bodies.includes(body), JSON.stringify(f));
  await page.screenshot({ path: process.env.SCREENSHOT || '/tmp/mqproxy-swagger-try-it-out.png' });
} catch (e) {
  check('browser run', false, e.message);
} finally {
  await browser.close();
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
