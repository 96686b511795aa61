// The gateway's browser page: one set of topics followed by HTTP polling, by
// WebSocket and by MQTT over WebSocket at once, each column counting its costs.
"use strict";

(() => {
  const KEPT_DELAYS = 500; // delays kept per column for the median
  const FEED_LENGTH = 8; // match events shown per column
  const SYMBOL = /^[A-Za-z0-9._-]{1,16}$/;
  const MATCH_TOPIC = /^(teams\/[A-Za-z0-9._-]{1,64}|fixtures(\/[A-Za-z0-9._:-]{1,64}){1,3})$/;
  const encoder = new TextEncoder();

  // ---- What every column shares: statistics and rendering ----------------

  class Column {
    constructor(strategy, title, how, unitName) {
      const template = document.getElementById("column-template");
      const node = template.content.firstElementChild.cloneNode(true);
      node.dataset.strategy = strategy;
      node.id = `column-${strategy}`;
      const heading = node.querySelector(".column-title");
      heading.id = `column-${strategy}-title`;
      heading.textContent = title;
      node.setAttribute("aria-labelledby", heading.id);
      node.querySelector(".column-how").textContent = how;
      node.querySelector(".unit-name").textContent = unitName;
      node.querySelector(".ticker caption").textContent = `Stock prices, ${title}`;
      template.parentElement.append(node);
      this.node = node;
      this.strategy = strategy;
      this.reset();
      this.jobId = null;
    }

    reset() {
      this.events = 0;
      this.units = 0; // requests or frames
      this.notModified = 0; // polling only: 304 answers
      this.bytes = 0;
      this.delays = [];
      this.lastDelay = null;
      this.prices = new Map(); // symbol to {price, change}
      this.feed = []; // newest first
      this.job = null;
      this.subscribedAt = new Map(); // topic to the time its subscription began
      this.dirty = true;
    }

    setConnection(state, text) {
      const status = this.node.querySelector(".connection");
      status.dataset.state = state;
      status.textContent = text;
    }

    showUnavailable(message) {
      this.setConnection("unavailable", "unavailable");
      let note = this.node.querySelector(".unavailable-note");
      if (!note) {
        note = document.createElement("p");
        note.className = "unavailable-note";
        this.node.querySelector(".metrics").before(note);
      }
      note.textContent = message;
    }

    noteSubscribed(topics) {
      const now = Date.now();
      for (const topic of topics) this.subscribedAt.set(topic, now);
    }

    // One event arrived: count it, time it and show it.
    receive(event) {
      if (!event || typeof event.topic !== "string") return;
      this.events += 1;
      const published = Date.parse(event.publishedAt);
      const since = this.subscribedAt.get(event.topic);
      // An event published before this column subscribed to its topic is
      // history (a retained message, a replay), not a measure of delivery.
      if (Number.isFinite(published) && (since === undefined || published >= since - 50)) {
        this.lastDelay = Math.max(0, Date.now() - published);
        this.delays.push(this.lastDelay);
        if (this.delays.length > KEPT_DELAYS) this.delays.shift();
      }
      const details = event.eventDetails || {};
      if (event.topic.startsWith("stocks/")) {
        this.updatePrice(event.topic.slice(7), details);
      } else if (event.topic.startsWith("jobs/")) {
        if (event.topic === `jobs/${this.jobId}`) this.job = details;
        announcer.job(details);
      } else {
        this.feed.unshift(event);
        if (this.feed.length > FEED_LENGTH) this.feed.pop();
        announcer.matchEvent(event);
      }
      this.dirty = true;
    }

    updatePrice(symbol, details) {
      const price = Number(details.price);
      if (!Number.isFinite(price)) return;
      const before = this.prices.get(symbol);
      let change = Number(
        details.changePercent ?? details.change_percent ?? details.changePct ?? NaN,
      );
      const previous = Number(details.previousPrice ?? details.previous_price ?? before?.price);
      if (!Number.isFinite(change) && Number.isFinite(previous) && previous !== 0) {
        change = ((price - previous) / previous) * 100;
      }
      this.prices.set(symbol, { price, change });
    }

    render() {
      if (!this.dirty) return;
      this.dirty = false;
      const metric = (name, text) => {
        this.node.querySelector(`[data-metric="${name}"]`).textContent = text;
      };
      metric("events", this.events.toLocaleString("en"));
      metric("delay", this.lastDelay === null ? "–" : formatMs(this.lastDelay));
      metric("median", this.delays.length ? formatMs(median(this.delays)) : "–");
      metric(
        "units",
        this.strategy === "poll" && this.notModified
          ? `${this.units.toLocaleString("en")} (${this.notModified} × 304)`
          : this.units.toLocaleString("en"),
      );
      metric("bytes", formatBytes(this.bytes));
      this.renderTicker();
      this.renderFeed();
      this.renderJob();
    }

    renderTicker() {
      const body = this.node.querySelector(".ticker tbody");
      const rows = [];
      for (const symbol of state.symbols) {
        const quote = this.prices.get(symbol);
        const row = document.createElement("tr");
        row.dataset.symbol = symbol;
        const name = document.createElement("th");
        name.scope = "row";
        name.textContent = symbol;
        const price = document.createElement("td");
        price.textContent = quote ? quote.price.toFixed(2) : "–";
        const change = document.createElement("td");
        if (quote && Number.isFinite(quote.change)) {
          const sign = quote.change > 0 ? "+" : quote.change < 0 ? "−" : "";
          change.textContent = `${sign}${Math.abs(quote.change).toFixed(2)} %`;
          change.className = quote.change > 0 ? "up" : quote.change < 0 ? "down" : "";
        } else {
          change.textContent = "–";
        }
        row.append(name, price, change);
        rows.push(row);
      }
      body.replaceChildren(...rows);
    }

    renderFeed() {
      const list = this.node.querySelector(".feed");
      list.replaceChildren(
        ...this.feed.map((event) => {
          const item = document.createElement("li");
          const what = document.createElement("span");
          what.className = "what";
          what.textContent = describeType(event.eventType);
          item.append(what, document.createTextNode(` ${describeDetails(event.eventDetails)}`));
          return item;
        }),
      );
      list.start = this.feed.length;
      this.node.querySelector(".feed-empty").hidden = this.feed.length > 0;
    }

    renderJob() {
      const bar = this.node.querySelector(".job progress");
      const text = this.node.querySelector(".job-text");
      if (!this.jobId) return;
      const job = this.job;
      const progress = job ? Math.max(0, Math.min(100, Number(job.progress) || 0)) : 0;
      bar.value = progress;
      bar.dataset.progress = String(progress);
      bar.setAttribute("aria-label", `Job progress, ${this.node.querySelector(".column-title").textContent}`);
      if (!job) {
        text.textContent = "Waiting for the job's first event…";
        return;
      }
      const step = job.step ? `, ${job.step.name} (${job.step.index}/${job.step.count})` : "";
      text.textContent = `${progress} %, ${job.state}${step}`;
      text.dataset.state = job.state;
    }

    followJob(jobId) {
      this.jobId = jobId;
      this.job = null;
      this.dirty = true;
    }
  }

  // ---- HTTP polling: GET /topics/{topic}/events?since= per topic ----------

  class PollingColumn extends Column {
    constructor() {
      super(
        "poll",
        "HTTP polling",
        `GET /topics/…/events?since= for each topic, every ${config.pollInterval} s`,
        "Requests",
      );
      this.cursors = new Map(); // topic to {since, etag}
      this.observeTransferSizes();
      this.loop();
    }

    // Bytes on the wire, headers included, as the browser's resource timing
    // reports them; the body's length when it reports nothing.
    observeTransferSizes() {
      this.measured = "PerformanceObserver" in window;
      if (!this.measured) return;
      performance.setResourceTimingBufferSize?.(1000);
      new PerformanceObserver((list) => {
        for (const entry of list.getEntries()) {
          if (entry.name.includes("/topics/") && entry.transferSize > 0) {
            this.bytes += entry.transferSize;
            this.dirty = true;
          }
        }
        performance.clearResourceTimings();
      }).observe({ type: "resource", buffered: false });
    }

    setTopics(topics) {
      const kept = new Map();
      for (const topic of topics) kept.set(topic, this.cursors.get(topic) ?? { since: null, etag: null });
      this.cursors = kept;
      this.noteSubscribed(topics.filter((t) => !this.subscribedAt.has(t)));
    }

    async loop() {
      this.setConnection("open", `polling every ${config.pollInterval} s`);
      for (;;) {
        const started = Date.now();
        const topics = [...this.cursors.keys()];
        await Promise.all(topics.map((topic) => this.pollTopic(topic)));
        const wait = Math.max(0, config.pollInterval * 1000 - (Date.now() - started));
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }

    async pollTopic(topic) {
      const cursor = this.cursors.get(topic);
      if (!cursor) return;
      // A new topic starts from its last offset: the column shows what is
      // published from now on, as the push columns do. A job starts from 0.
      const first = cursor.since === null;
      const since = first ? (topic.startsWith("jobs/") ? 0 : null) : cursor.since;
      const query = since === null ? "since=0&limit=1" : `since=${since}&limit=1000`;
      const headers = cursor.etag && !first ? { "If-None-Match": cursor.etag } : {};
      let response;
      try {
        response = await fetch(`/topics/${topic}/events?${query}`, { headers, cache: "no-store" });
      } catch {
        this.setConnection("closed", "gateway unreachable; retrying");
        return;
      }
      this.units += 1;
      this.dirty = true;
      if (response.status === 304) {
        this.notModified += 1;
        this.setConnection("open", `polling every ${config.pollInterval} s`);
        return;
      }
      const text = await response.text();
      if (!this.measured) this.bytes += encoder.encode(text).length;
      if (!response.ok) {
        // The topic's history was reset: start again from its beginning.
        if (text.includes("offset_ahead")) cursor.since = 0;
        return;
      }
      this.setConnection("open", `polling every ${config.pollInterval} s`);
      const body = JSON.parse(text);
      cursor.etag = response.headers.get("ETag");
      if (since === null) {
        cursor.since = body.lastOffset;
        return;
      }
      for (const event of body.events) this.receive(event);
      cursor.since = body.nextOffset;
      if (body.more) await this.pollTopic(topic);
    }

    followJob(jobId) {
      super.followJob(jobId);
      const topics = [...this.cursors.keys()].filter((t) => !t.startsWith("jobs/"));
      this.setTopics([...topics, `jobs/${jobId}`]);
    }
  }

  // ---- WebSocket: one socket to /ws, subscribe and unsubscribe ------------

  class WebSocketColumn extends Column {
    constructor() {
      super("ws", "WebSocket", "one socket to the gateway's /ws; events pushed as they come", "Frames");
      this.topics = [];
      this.socket = null;
      this.backoff = 500;
      this.connect();
    }

    connect() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const socket = new WebSocket(`${scheme}//${location.host}${config.wsPath}`);
      this.socket = socket;
      this.setConnection("connecting", "connecting…");
      socket.addEventListener("message", (message) => this.onMessage(message.data));
      socket.addEventListener("close", () => {
        if (this.socket !== socket) return;
        this.setConnection("closed", "disconnected; reconnecting");
        setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 8000);
      });
    }

    onMessage(data) {
      this.units += 1;
      this.bytes += encoder.encode(data).length;
      this.dirty = true;
      const message = JSON.parse(data);
      if (message.type === "welcome") {
        this.backoff = 500;
        this.setConnection("open", `connected to ${message.replica}`);
        this.send({ op: "subscribe", topics: this.topics.filter((t) => !t.startsWith("jobs/")) });
        if (this.jobId) this.subscribeJob();
      } else if (message.type === "event") {
        this.receive(message);
      } else if (message.type === "error") {
        this.setConnection("open", `refused: ${message.message}`);
      }
    }

    send(message) {
      if (this.socket?.readyState !== WebSocket.OPEN) return;
      if (message.topics && message.topics.length === 0) return;
      this.socket.send(JSON.stringify(message));
      if (message.op === "subscribe") this.noteSubscribed(message.topics);
    }

    setTopics(topics) {
      const gone = this.topics.filter((t) => !topics.includes(t) && !t.startsWith("jobs/"));
      const added = topics.filter((t) => !this.topics.includes(t));
      this.send({ op: "unsubscribe", topics: gone });
      this.send({ op: "subscribe", topics: added });
      this.topics = [...topics, ...this.topics.filter((t) => t.startsWith("jobs/"))];
    }

    subscribeJob() {
      const topic = `jobs/${this.jobId}`;
      // From offset 0: the job's events from its start, whenever we subscribe.
      this.send({ op: "subscribe", topics: [topic], offsets: { [topic]: 0 } });
    }

    followJob(jobId) {
      const old = this.topics.filter((t) => t.startsWith("jobs/"));
      this.send({ op: "unsubscribe", topics: old });
      super.followJob(jobId);
      this.topics = this.topics.filter((t) => !t.startsWith("jobs/"));
      this.topics.push(`jobs/${jobId}`);
      this.subscribeJob();
    }
  }

  // ---- MQTT over WebSocket, to the broker the gateway publishes to --------

  class MqttColumn extends Column {
    constructor() {
      super("mqtt", "MQTT over WebSocket", "subscribed on the MQTT broker the gateway publishes to", "Frames");
      this.topics = [];
      this.client = null;
      const settings = config.mqtt;
      if (!settings.url) {
        this.showUnavailable(`MQTT is unavailable: ${settings.unavailable}.`);
        return;
      }
      this.setConnection("connecting", `loading the MQTT client…`);
      const script = document.createElement("script");
      script.src = settings.script;
      script.onload = () => this.connect(settings.url);
      script.onerror = () =>
        this.showUnavailable(
          "MQTT is unavailable: the browser MQTT client could not be loaded " +
            "(run deploy/dev/install.sh to install it).",
        );
      document.head.append(script);
    }

    connect(url) {
      if (!window.mqtt) {
        this.showUnavailable("MQTT is unavailable: the MQTT client did not load.");
        return;
      }
      this.setConnection("connecting", `connecting to ${url}…`);
      const client = window.mqtt.connect(url, {
        protocolVersion: 4,
        clean: true,
        clientId: `page-${Math.random().toString(16).slice(2, 14)}`,
        reconnectPeriod: 2000,
        connectTimeout: 8000,
      });
      this.client = client;
      client.on("connect", () => {
        this.setConnection("open", `connected to ${url}`);
        this.subscribe(this.topics);
      });
      client.on("reconnect", () => this.setConnection("connecting", "reconnecting…"));
      client.on("offline", () => this.setConnection("closed", `cannot reach ${url}; retrying`));
      client.on("error", (error) => this.setConnection("closed", `error: ${error.message}`));
      client.on("packetreceive", (packet) => {
        // Fixed header (1 byte), remaining length (1 to 4 bytes), then the rest.
        const length = packet.length ?? 0;
        this.bytes += 1 + (length < 128 ? 1 : length < 16384 ? 2 : 3) + length;
        this.units += 1;
        this.dirty = true;
      });
      client.on("message", (topic, payload) => {
        let event;
        try {
          event = JSON.parse(new TextDecoder().decode(payload));
        } catch {
          return;
        }
        this.receive(event);
      });
    }

    subscribe(topics) {
      if (!this.client?.connected || topics.length === 0) return;
      const prefix = config.mqtt.prefix;
      for (const topic of topics) {
        const qos = topic.startsWith("stocks/") ? 0 : 1;
        this.client.subscribe(prefix + topic, { qos });
      }
      this.noteSubscribed(topics);
    }

    setTopics(topics) {
      const gone = this.topics.filter((t) => !topics.includes(t) && !t.startsWith("jobs/"));
      const added = topics.filter((t) => !this.topics.includes(t));
      if (this.client?.connected && gone.length) {
        this.client.unsubscribe(gone.map((t) => config.mqtt.prefix + t));
      }
      this.subscribe(added);
      this.topics = [...topics, ...this.topics.filter((t) => t.startsWith("jobs/"))];
    }

    followJob(jobId) {
      if (!this.client) return;
      const old = this.topics.filter((t) => t.startsWith("jobs/"));
      if (this.client.connected && old.length) {
        this.client.unsubscribe(old.map((t) => config.mqtt.prefix + t));
      }
      super.followJob(jobId);
      // By its full id: the broker refuses a wildcard in place of a job id.
      const topic = `jobs/${jobId}`;
      this.topics = this.topics.filter((t) => !t.startsWith("jobs/"));
      this.topics.push(topic);
      this.subscribe([topic]);
    }
  }

  // ---- One polite announcement for all columns ---------------------------

  const announcer = {
    seen: new Set(),
    say(key, text) {
      if (this.seen.has(key)) return;
      this.seen.add(key);
      document.getElementById("announcer").textContent = text;
    },
    // Each key event once, whichever column gets it first; prices are not
    // announced, since they change every second.
    matchEvent(event) {
      this.say(`event:${event.id}`, `${describeType(event.eventType)} ${describeDetails(event.eventDetails)}`);
    },
    job(details) {
      if (!details || !details.id) return;
      const progress = Number(details.progress) || 0;
      const milestone = details.state === "running" ? Math.floor(progress / 25) * 25 : details.state;
      this.say(`job:${details.id}:${milestone}`, `Job ${details.state}, ${progress} %`);
    },
  };

  // ---- Helpers -------------------------------------------------------------

  function median(values) {
    const sorted = [...values].sort((a, b) => a - b);
    const middle = Math.floor(sorted.length / 2);
    return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
  }

  function formatMs(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  function formatBytes(bytes) {
    if (bytes < 10_000) return `${bytes.toLocaleString("en")} B`;
    if (bytes < 10_000_000) return `${(bytes / 1000).toFixed(1)} kB`;
    return `${(bytes / 1_000_000).toFixed(1)} MB`;
  }

  function describeType(type) {
    const words = String(type || "event").toLowerCase().replaceAll("_", " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function describeDetails(details) {
    if (!details || typeof details !== "object") return "";
    const parts = [];
    if (details.minute !== undefined) parts.push(`${details.minute}'`);
    for (const key of ["team", "player", "score", "description", "text"]) {
      const value = details[key];
      if (typeof value === "string" || typeof value === "number") parts.push(String(value));
    }
    if (parts.length === 0) {
      const text = JSON.stringify(details);
      parts.push(text.length > 80 ? `${text.slice(0, 77)}…` : text);
    }
    return parts.join(", ");
  }

  // ---- The controls ---------------------------------------------------------

  const state = { symbols: [], match: "" };
  let config = null;
  let columns = [];

  function readTopics() {
    const symbols = document
      .getElementById("symbols")
      .value.split(",")
      .map((s) => s.trim().toUpperCase())
      .filter(Boolean);
    const match = document.getElementById("match").value.trim();
    if (symbols.length === 0 || symbols.length > 10 || !symbols.every((s) => SYMBOL.test(s))) {
      throw new Error("Give 1 to 10 stock symbols of letters, digits, dots, dashes or underscores.");
    }
    if (!MATCH_TOPIC.test(match)) {
      throw new Error("Match events: give teams/CODE or fixtures/DATE/HOME-AWAY, without wildcards.");
    }
    return { symbols: [...new Set(symbols)], match };
  }

  function applyTopics() {
    const error = document.getElementById("topics-error");
    let chosen;
    try {
      chosen = readTopics();
    } catch (problem) {
      error.textContent = problem.message;
      error.hidden = false;
      return;
    }
    error.hidden = true;
    const matchChanged = chosen.match !== state.match;
    Object.assign(state, chosen);
    const topics = [...state.symbols.map((s) => `stocks/${s}`), state.match];
    for (const column of columns) {
      if (matchChanged) column.feed = [];
      column.setTopics(topics);
      column.dirty = true;
    }
  }

  async function startJob(event) {
    event.preventDefault();
    const status = document.getElementById("job-status");
    const button = document.getElementById("start-job");
    const seconds = Number(document.getElementById("job-seconds").value);
    if (!(seconds >= 2 && seconds <= config.jobs.maxSeconds)) {
      status.textContent = `Give a length from 2 to ${config.jobs.maxSeconds} seconds.`;
      return;
    }
    let request;
    if (config.jobs.demo) {
      request = { headers: { "Content-Type": "application/json", "X-Gateway-Page": "1" }, body: { seconds } };
    } else {
      const key = document.getElementById("api-key").value.trim();
      if (!key) {
        status.textContent = "Paste the gateway's API key first.";
        document.getElementById("api-key").focus();
        return;
      }
      request = {
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}` },
        body: { kind: "db-refresh", params: { step_seconds: seconds / 4 } },
      };
    }
    button.disabled = true;
    status.textContent = "Starting a job…";
    try {
      const response = await fetch(config.jobs.path, {
        method: "POST",
        headers: request.headers,
        body: JSON.stringify(request.body),
      });
      const body = await response.json();
      if (!response.ok) {
        status.textContent = `The gateway refused: ${body.error?.message ?? response.status}.`;
        return;
      }
      status.textContent = `Job ${body.id.slice(0, 8)}… started; following ${body.topic.slice(0, 13)}… in every column.`;
      document.body.dataset.jobId = body.id;
      for (const column of columns) column.followJob(body.id);
    } catch (problem) {
      status.textContent = `Could not start a job: ${problem.message}.`;
    } finally {
      button.disabled = false;
    }
  }

  async function main() {
    try {
      const response = await fetch("/page/config.json", { cache: "no-store" });
      config = await response.json();
    } catch (problem) {
      document.getElementById("job-status").textContent = `Cannot read the page's settings: ${problem.message}`;
      return;
    }
    document.getElementById("api-key-field").hidden = config.jobs.demo;
    columns = [new PollingColumn(), new WebSocketColumn(), new MqttColumn()];
    document.getElementById("topics-form").addEventListener("submit", (event) => {
      event.preventDefault();
      applyTopics();
    });
    document.getElementById("job-form").addEventListener("submit", startJob);
    applyTopics();
    setInterval(() => {
      for (const column of columns) column.render();
    }, 250);
    document.body.dataset.ready = "true";
  }

  main();
})();
