// The mqproxy console: calls only the admin API (and /metrics for rates). No framework.
'use strict';

const $ = (sel) => document.querySelector(sel);
const state = { selected: null, last: null, history: [] };

const tokenInput = $('#token');
tokenInput.value = localStorage.getItem('mqproxy-admin-token') || '';
tokenInput.addEventListener('change', () => {
  localStorage.setItem('mqproxy-admin-token', tokenInput.value);
  refresh();
});

function headers() {
  const t = tokenInput.value.trim();
  return t ? { Authorization: 'Bearer ' + t } : {};
}

async function api(path, form) {
  const init = { headers: headers() };
  if (form) {
    init.method = 'POST';
    init.body = new URLSearchParams(form);
  }
  const resp = await fetch(path, init);
  const body = await resp.json();
  if (body.status !== 200) throw new Error(`${path}: ${body.status} ${body.message || ''}`);
  return body.result;
}

function say(text, error) {
  const s = $('#status');
  s.textContent = text;
  s.className = 'status' + (error ? ' error' : '');
}

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function time(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : '–';
}

// Sums a metric's samples (optionally only those whose labels contain `filter`).
function total(text, metric, filter) {
  let sum = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(metric + '{') || (filter && !line.includes(filter))) continue;
    sum += Number(line.slice(line.lastIndexOf(' ') + 1)) || 0;
  }
  return sum;
}

async function rates() {
  const text = await (await fetch('/metrics')).text();
  const now = Date.now();
  const produced = total(text, 'mqproxy_produced_messages_total', 'status="200"');
  const delivered = total(text, 'mqproxy_delivered_messages_total');
  if (state.last) {
    const secs = (now - state.last.at) / 1000;
    const p = Math.max(0, (produced - state.last.produced) / secs);
    const d = Math.max(0, (delivered - state.last.delivered) / secs);
    $('#produce-rate').textContent = p.toFixed(1);
    $('#deliver-rate').textContent = d.toFixed(1);
    state.history.push([p, d]);
    if (state.history.length > 60) state.history.shift();
    spark();
  }
  state.last = { at: now, produced, delivered };
  return text;
}

function spark() {
  const c = $('#spark');
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1, ...state.history.flat());
  [['#58a6ff', 0], ['#3fb950', 1]].forEach(([color, i]) => {
    g.strokeStyle = color;
    g.beginPath();
    state.history.forEach((h, x) => {
      const px = (x / 59) * (c.width - 2) + 1;
      const py = c.height - 2 - (h[i] / max) * (c.height - 4);
      if (x === 0) g.moveTo(px, py); else g.lineTo(px, py);
    });
    g.stroke();
  });
}

function consumerRow(c, offsets, settings) {
  const tr = document.createElement('tr');
  tr.className = 'consumer' + (state.selected === c.name ? ' selected' : '');
  tr.dataset.consumer = c.name;
  tr.append(cell(c.name), cell(c.topic), cell(c.mode));
  const lag = offsets.lag;
  tr.append(cell(String(lag), 'num lag ' + (lag === 0 ? 'zero' : 'behind')));

  const st = cell(settings.paused ? 'paused ' : 'running ', settings.paused ? 'paused' : 'running');
  const toggle = document.createElement('button');
  toggle.className = 'pause';
  toggle.textContent = settings.paused ? 'Resume' : 'Pause';
  toggle.onclick = (e) => {
    e.stopPropagation();
    act(`${settings.paused ? 'resumed' : 'paused'} ${c.name}`, { consumer: c.name, pause: String(!settings.paused) });
  };
  st.append(toggle);
  tr.append(st);

  const limit = document.createElement('td');
  const enabled = document.createElement('input');
  enabled.type = 'checkbox';
  enabled.checked = settings.rateLimitEnabled;
  enabled.title = 'rate limit on';
  const rate = document.createElement('input');
  rate.type = 'number';
  rate.min = 1;
  rate.value = settings.limitRate;
  const set = document.createElement('button');
  set.textContent = 'Set';
  set.className = 'set-rate';
  set.onclick = (e) => {
    e.stopPropagation();
    act(`rate limit of ${c.name} set`, {
      consumer: c.name, rateLimitEnabled: String(enabled.checked), limitRate: rate.value,
    });
  };
  [enabled, rate].forEach((el) => el.addEventListener('click', (e) => e.stopPropagation()));
  limit.append(enabled, ' ', rate, ' ', set);
  tr.append(limit);

  const resend = document.createElement('td');
  const msgId = document.createElement('input');
  msgId.className = 'msgid';
  msgId.placeholder = 'msgId';
  msgId.addEventListener('click', (e) => e.stopPropagation());
  const send = document.createElement('button');
  send.textContent = 'Re-send';
  send.onclick = (e) => {
    e.stopPropagation();
    if (msgId.value.trim()) act(`message re-sent to ${c.name}`, { consumer: c.name, retryMsgId: msgId.value.trim() });
  };
  resend.append(msgId, ' ', send);
  tr.append(resend);

  tr.onclick = () => {
    state.selected = c.name;
    refresh();
  };
  return tr;
}

async function act(what, form) {
  try {
    await api('/admin/consumer/config', form);
    say(what);
  } catch (e) {
    say(e.message, true);
  }
  refresh();
}

function showQueues(name, offsets) {
  $('#queues-section').hidden = false;
  $('#queues-of').textContent = name;
  const clients = (offsets.connected || []).map((c) =>
    `${c.clientId ? c.clientId + ' @ ' : ''}${c.clientIp} (last pull ${time(c.lastSeen)})`);
  $('#connected').textContent = 'Connected clients: ' + (clients.length ? clients.join(', ') : 'none seen yet');
  const body = $('#queues tbody');
  body.replaceChildren();
  for (const client of offsets.clients) {
    for (const q of client.queues) {
      const tr = document.createElement('tr');
      tr.append(
        cell(client.clientId || '(group)'),
        cell(q.messageQueue.brokerName),
        cell(String(q.messageQueue.queueId), 'num'),
        cell(String(q.minOffset), 'num'),
        cell(String(q.maxOffset), 'num'),
        cell(q.committedOffset === undefined ? '–' : String(q.committedOffset), 'num'),
        cell(String(q.lag), 'num lag ' + (q.lag === 0 ? 'zero' : 'behind')),
        cell(time(q.lockTimestamp)),
        cell(time(q.lastConsumeTimestamp)),
        cell(q.lastConsumeClientIp || '–'),
      );
      body.append(tr);
    }
  }
}

// The segments `pop=true` pulls handed out and nobody acknowledged yet; Skip acknowledges one
// (as MQCloud's console does: /mq/ack with pop=true and the segment's requestId).
async function showPopSegments(c) {
  const path = `/mq/${c.mode}/pop/ack?consumer=${encodeURIComponent(c.name)}`;
  const resp = await fetch(path, { headers: headers() });
  const reply = await resp.json();
  if (reply.status !== 200) throw new Error(`${path}: ${reply.status} ${reply.message || ''}`);
  $('#pop-summary').textContent = reply.message || '';
  const body = $('#pop-segments tbody');
  body.replaceChildren();
  for (const g of reply.result || []) {
    const tr = document.createElement('tr');
    tr.className = 'pop-segment';
    const skip = document.createElement('button');
    skip.textContent = 'Skip';
    skip.className = 'skip';
    skip.onclick = async () => {
      const form = { topic: c.topic, consumer: c.name, requestId: g.requestId, pop: 'true' };
      if (g.clientId) form.clientId = g.clientId;
      try {
        const r = await (await fetch('/mq/ack?' + new URLSearchParams(form), { headers: headers() })).json();
        if (r.status !== 200) throw new Error(`/mq/ack: ${r.status} ${r.message || ''}`);
        say(`segment ${g.brokerName}:${g.queueId} [${g.offset}, ${g.nextOffset}) skipped: ${r.message}`);
      } catch (e) {
        say(e.message, true);
      }
      refresh();
    };
    const actions = document.createElement('td');
    actions.append(skip);
    tr.append(
      cell(g.clientId || '(group)'),
      cell(g.brokerName),
      cell(String(g.queueId), 'num'),
      cell(String(g.offset), 'num'),
      cell(String(g.nextOffset), 'num'),
      cell(time(g.lockTime)),
      cell(time(g.expireTime)),
      cell(String(g.retryTimes), 'num'),
      cell(g.clientIp || '–'),
      actions,
    );
    body.append(tr);
  }
}

function showTopics(registry, metricsText) {
  const body = $('#topics tbody');
  body.replaceChildren();
  for (const t of registry.topics) {
    let messages = 0;
    const queues = t.queues.map((q) => {
      const needle = `topic="${t.name}",broker="${q.brokerName}",queue="${q.queueId}"`;
      const max = total(metricsText, 'mqproxy_queue_max_offset', needle);
      messages += max;
      return `${q.brokerName}:${q.queueId} = ${max}`;
    });
    const producers = registry.producers.filter((p) => p.topic === t.name).map((p) => p.name);
    const tr = document.createElement('tr');
    tr.dataset.topic = t.name;
    // A lite-message parent shows how many lite topics it has now; others, nothing.
    const lite = t.lite ? String(total(metricsText, 'mqproxy_lite_topics', `topic="${t.name}"`)) : '';
    tr.append(cell(t.name), cell(queues.join(', ')), cell(String(messages), 'num'), cell(lite, 'num'), cell(producers.join(', ')));
    body.append(tr);
  }
}

async function refresh() {
  try {
    const [registry, metricsText] = await Promise.all([api('/admin/registry'), rates()]);
    const rows = [];
    for (const c of registry.consumers) {
      const [offsets, settings] = await Promise.all([
        api('/admin/consumer/offsets?consumer=' + encodeURIComponent(c.name)),
        api('/admin/consumer/config?consumer=' + encodeURIComponent(c.name)),
      ]);
      rows.push(consumerRow(c, offsets, settings));
      if (state.selected === c.name) {
        showQueues(c.name, offsets);
        await showPopSegments(c);
      }
    }
    // Do not wipe what an operator is typing.
    const focused = document.activeElement;
    const typing = focused && focused.tagName === 'INPUT' && focused.type !== 'checkbox' && $('#consumers').contains(focused);
    if (!typing) $('#consumers tbody').replaceChildren(...rows);
    showTopics(registry, metricsText);
    if ($('#status').className === 'status error' && $('#status').textContent.includes('/admin')) say('');
  } catch (e) {
    say(e.message + (e.message.includes(' 401') || e.message.includes(' 403') ? ' (set the admin token)' : ''), true);
  }
}

// One stored message by msgId (where it sits, the producer's address, the body).
$('#find-message').addEventListener('submit', async (e) => {
  e.preventDefault();
  const table = $('#message');
  try {
    const m = await api('/admin/message?msgId=' + encodeURIComponent($('#find-msg-id').value.trim()));
    table.querySelector('.m-topic').textContent = m.topic;
    table.querySelector('.m-queue').textContent = `${m.brokerName}:${m.queueId} offset ${m.queueOffset}`;
    table.querySelector('.m-stored').textContent = new Date(m.storeTimestamp).toLocaleString();
    table.querySelector('.m-keys').textContent = m.keys || '–';
    table.querySelector('.m-client-ip').textContent = m.clientIp || '–';
    table.querySelector('.m-body').textContent = m.body;
    table.hidden = false;
    say('');
  } catch (err) {
    table.hidden = true;
    say(err.message, true);
  }
});

refresh();
setInterval(refresh, 2000);
