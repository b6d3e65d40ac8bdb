// The console and the seed's jQuery demos in a real browser (headless Chromium driven by
// playwright-core) against a running mqproxy with the demo registry:
// - demo/produce.html logs "send ok"; demo/clustering.html receives what was produced;
// - the console shows the clustering consumer's lag go to 0, and its Pause button makes a pull
//   answer PAUSED (Resume undoes it);
// - demo/push.html (EventSource on /mq/stream) receives a message as it is produced and acks it;
//   the console finds that message by msgId, with the producer's client IP;
// - a produce with liteTopics makes a lite topic, counted in the console's topics table.
// Usage: node console-and-demos.mjs http://127.0.0.1:PORT http://127.0.0.1:ADMIN_PORT
// (the public listener, then the admin listener the console is served on; screenshots into
// $ARTIFACTS). The console on the public listener is refused its admin calls without a token.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const base = process.argv[2];
const adminBase = process.argv[3];
const artifacts = process.env.ARTIFACTS || '/tmp/mqproxy-browser-artifacts';
mkdirSync(artifacts, { recursive: true });
let passed = 0;
let failed = 0;
function check(name, ok, detail) {
  if (ok) passed++; else failed++;
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${ok ? '' : ': ' + detail}`);
}

// Resolves with the first console message matching `re` (or rejects after `ms`).
function consoleMessage(page, re, ms) {
  return new Promise((resolve, reject) => {
    const seen = [];
    const timer = setTimeout(() => reject(new Error(`no console message ${re} within ${ms} ms; saw: ${seen.join(' | ')}`)), ms);
    page.on('console', (m) => {
      seen.push(m.text());
      if (re.test(m.text())) { clearTimeout(timer); resolve(m.text()); }
    });
  });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });

  // The produce demo, as written in the document (host prefix aside).
  const produce = await context.newPage();
  const sent = consoleMessage(produce, /^send ok$/, 15000);
  await produce.goto(`${base}/demo/produce.html`);
  check('demo/produce.html logs "send ok"', (await sent.catch((e) => e.message)) === 'send ok', 'no send ok');
  await produce.screenshot({ path: `${artifacts}/demo-produce.png`, fullPage: true });

  // The console: the clustering consumer has lag (what the demo produced), shown in its row.
  const consolePage = await context.newPage();
  await consolePage.goto(`${adminBase}/console/`);
  const row = consolePage.locator('tr[data-consumer="http-clustering-consumer"]');
  await row.waitFor({ timeout: 15000 });
  await consolePage.waitForFunction(
    () => Number(document.querySelector('tr[data-consumer="http-clustering-consumer"] .lag')?.textContent) > 0,
    null, { timeout: 15000 });
  check('console shows the clustering consumer behind', true, '');
  await consolePage.screenshot({ path: `${artifacts}/console-lag.png`, fullPage: true });

  // The clustering demo consumes it: "FOUND,<n>" in its log.
  const clustering = await context.newPage();
  const found = consoleMessage(clustering, /^FOUND,\d+$/, 15000);
  await clustering.goto(`${base}/demo/clustering.html`);
  const got = await found.catch((e) => e.message);
  check('demo/clustering.html receives what was produced', /^FOUND,\d+$/.test(got), got);
  await clustering.screenshot({ path: `${artifacts}/demo-clustering.png`, fullPage: true });

  // It acknowledges with its next poll (1 s later): the console's lag goes to 0.
  const zero = await consolePage.waitForFunction(
    () => document.querySelector('tr[data-consumer="http-clustering-consumer"] .lag')?.textContent === '0',
    null, { timeout: 20000 }).then(() => true, (e) => e.message);
  check('console shows the lag go to 0 once consumed', zero === true, zero);
  await clustering.close();

  // Pause from the console: a pull answers PAUSED; Resume undoes it.
  await row.locator('button.pause').click();
  await consolePage.waitForFunction(
    () => document.querySelector('tr[data-consumer="http-clustering-consumer"] button.pause')?.textContent === 'Resume',
    null, { timeout: 10000 });
  const pull = () => consolePage.evaluate(async () => {
    const r = await fetch('/mq/message?topic=mqcloud-http-test-topic&consumer=http-clustering-consumer');
    return (await r.json()).result?.status;
  });
  const paused = await pull();
  check('Pause in the console makes a pull answer PAUSED', paused === 'PAUSED', paused);
  await consolePage.screenshot({ path: `${artifacts}/console-paused.png`, fullPage: true });
  await consolePage.locator('tr[data-consumer="http-clustering-consumer"] button.pause').click();
  await consolePage.waitForFunction(
    () => document.querySelector('tr[data-consumer="http-clustering-consumer"] button.pause')?.textContent === 'Pause',
    null, { timeout: 10000 });
  const resumed = await pull();
  check('Resume in the console lets pulls through again', resumed !== 'PAUSED', resumed);

  // The push demo: a plain EventSource on /mq/stream gets what is produced after it opened,
  // acknowledges it with /mq/ack, and the console's lag goes back to 0.
  const push = await context.newPage();
  const pushed = consoleMessage(push, /^PUSHED,\d+/, 15000);
  const acked = consoleMessage(push, /^ack ok$/, 15000);
  await push.goto(`${base}/demo/push.html`);
  await push.waitForFunction(() => typeof source !== 'undefined' && source.readyState === EventSource.OPEN, null, { timeout: 15000 });
  const sentAt = Date.now();
  const produced = await push.evaluate(async () => {
    const r = await fetch('/mq/produce', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'producer=mqcloud-http-test-topic-producer&message=pushed-to-the-browser',
    });
    return await r.json();
  });
  check('a message produced for the push demo', produced.status === 200, JSON.stringify(produced));
  const pushedLine = await pushed.catch((e) => e.message);
  check('demo/push.html receives it through EventSource', /^PUSHED,1/.test(pushedLine), pushedLine);
  console.log(`     (produce -> EventSource event: ${Date.now() - sentAt} ms, including the produce call)`);
  const ackLine = await acked.catch((e) => e.message);
  check('demo/push.html acknowledges it with /mq/ack', ackLine === 'ack ok', ackLine);
  await push.screenshot({ path: `${artifacts}/demo-push.png`, fullPage: true });
  const drained = await consolePage.waitForFunction(
    () => document.querySelector('tr[data-consumer="http-clustering-consumer"] .lag')?.textContent === '0',
    null, { timeout: 20000 }).then(() => true, (e) => e.message);
  check('console shows the lag at 0 after the pushed batch was acknowledged', drained === true, drained);
  await push.close();

  // The console finds that message by its msgId, with the address it was produced from.
  await consolePage.fill('#find-msg-id', produced.result.msgId);
  await consolePage.click('#find-message button');
  const shown = await consolePage.waitForFunction(
    () => !document.querySelector('#message').hidden && document.querySelector('#message .m-body').textContent,
    null, { timeout: 10000 }).then(() => consolePage.evaluate(() => ({
      body: document.querySelector('#message .m-body').textContent,
      clientIp: document.querySelector('#message .m-client-ip').textContent,
    })), (e) => ({ error: e.message }));
  check('console finds the message by msgId, with the producer\'s client IP',
    shown.body === 'pushed-to-the-browser' && shown.clientIp === '127.0.0.1', JSON.stringify(shown));
  await consolePage.screenshot({ path: `${artifacts}/console-message.png`, fullPage: true });

  // POP: a segment pulled with pop=true and not acknowledged shows in the consumer's "POP
  // segments in flight"; its Skip button acknowledges it and the lag goes back to 0.
  // The name cell: the row's middle is its Pause button.
  await row.locator('td').first().click();
  const popped = await consolePage.evaluate(async () => {
    await fetch('/mq/produce', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'producer=mqcloud-http-test-topic-producer&message=popped',
    });
    const r = await fetch('/mq/message?topic=mqcloud-http-test-topic&consumer=http-clustering-consumer&pop=true');
    return await r.json();
  });
  check('a pop=true pull gets the message', popped.result?.msgList?.[0]?.message === 'popped', JSON.stringify(popped));
  const listed = await consolePage.waitForFunction(
    () => document.querySelectorAll('#pop-segments tr.pop-segment').length === 1,
    null, { timeout: 10000 }).then(() => true, (e) => e.message);
  check('console lists the POP segment in flight', listed === true, listed);
  await consolePage.screenshot({ path: `${artifacts}/console-pop.png`, fullPage: true });
  await consolePage.locator('#pop-segments button.skip').click();
  const skipped = await consolePage.waitForFunction(
    () => document.querySelectorAll('#pop-segments tr.pop-segment').length === 0
      && document.querySelector('tr[data-consumer="http-clustering-consumer"] .lag')?.textContent === '0',
    null, { timeout: 10000 }).then(() => true, (e) => e.message);
  check('Skip in the console acknowledges the segment (lag 0)', skipped === true, skipped);

  // A lite topic made by a produce: the console counts the parent's lite topics.
  const lite = await consolePage.evaluate(async () => {
    const r = await fetch('/mq/produce', {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: 'producer=mqcloud-http-test-topic-producer&message=to-a-session&liteTopics=browser-session',
    });
    return await r.json();
  });
  check('a produce with liteTopics', lite.status === 200, JSON.stringify(lite));
  const counted = await consolePage.waitForFunction(
    () => document.querySelector('tr[data-topic="mqcloud-http-test-topic"] td:nth-child(4)')?.textContent === '1',
    null, { timeout: 15000 }).then(() => true, (e) => e.message);
  check('console counts the topic\'s lite topics', counted === true, counted);
} catch (e) {
  check('browser run', false, e.message);
} finally {
  await browser.close();
}
console.log(`${passed} passed, ${failed} failed (screenshots in ${artifacts})`);
process.exit(failed === 0 ? 0 : 1);
