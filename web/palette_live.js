// rcca-palette: the live client of the palette widget: live sessions, websocket routing and queueing.
//
// Only exports (the frontend imports every .js file of the pack as an extension); rcca_palette.js
// calls installLiveRouting() once, and each PaletteCanvas owns a LiveClient.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const LIVE_EDIT_INTERVAL_MS = 100; // at most ~10 edits per second while a stroke is in progress
const QUEUE_WAIT_MS = 60_000; // how long a Live start queued behind another queueing may wait for its turn

// ---- graphs -------------------------------------------------------------------------------------
/** The workflow's root graph (`app.graph` is deprecated for `rootGraph` in newer frontends). */
export function rootGraph() {
  return app.rootGraph ?? app.graph ?? null;
}

/** Every node of the root graph and, depth first, of the subgraphs inside it. */
export function* allNodes(graph = rootGraph()) {
  for (const node of graph?.nodes ?? []) {
    yield node;
    if (node.subgraph && node.subgraph !== graph) yield* allNodes(node.subgraph);
  }
}

/** The id the backend knows a node by: its id, prefixed by the ids of the subgraph nodes around it
 * ("5:3"). A subgraph used twice holds one node object for both uses: the first use is taken. */
export function executionId(node, graph = rootGraph(), prefix = "") {
  for (const n of graph?.nodes ?? []) {
    if (n === node) return prefix + String(n.id);
    if (n.subgraph && n.subgraph !== graph) {
      const inner = executionId(node, n.subgraph, `${prefix}${n.id}:`);
      if (inner != null) return inner;
    }
  }
  return null;
}

/** The node an execution id names, walking the subgraphs it passes through. */
export function nodeByExecutionId(id) {
  let graph = rootGraph();
  const parts = String(id).split(":");
  for (const part of parts.slice(0, -1)) graph = graph?.getNodeById?.(part)?.subgraph ?? null;
  return graph?.getNodeById?.(parts.at(-1)) ?? null;
}

// ---- live records -------------------------------------------------------------------------------
// A session belongs to a palette node's execution id within one workflow tab, not to a node object:
// ComfyUI rebuilds node objects on undo, paste, reload and tab switches, and the rebuilt node must
// keep showing the same stream, while the same id in another tab is another node.
const liveRecords = new Map(); // "<workflow token>|<execution id>" -> live record
const keyOfSession = new Map(); // session id -> record key
const earlyFrames = new Map(); // session id -> frame detail that arrived before "executed"
const workflowOfPrompt = new Map(); // prompt id -> workflow token of the tab that queued it (Live)
const workflowTokens = new WeakMap(); // workflow tab object -> token
let tokenCount = 0;

function workflowToken() {
  const workflow = app.extensionManager?.workflow?.activeWorkflow;
  if (!workflow) return "0";
  let token = workflowTokens.get(workflow);
  if (!token) workflowTokens.set(workflow, (token = String(++tokenCount)));
  return token;
}

function recordKey(token, execId) {
  return `${token}|${execId}`;
}

function liveRecord(key) {
  let rec = liveRecords.get(key);
  if (!rec) {
    rec = { session: null, state: "off", reason: "", cancelStart: false, fps: 0, frames: 0, lastFrame: null, frameImage: null,
            lastEditSeq: null, photoSeq: 0, error: "", width: 0, height: 0, promptId: null };
    liveRecords.set(key, rec);
  }
  return rec;
}

/** The palette widget a record belongs to, when its workflow is the one shown. */
function canvasOfKey(key) {
  const bar = key.indexOf("|");
  if (key.slice(0, bar) !== workflowToken()) return null;
  return nodeByExecutionId(key.slice(bar + 1))?.rccaCanvas ?? null;
}

function applyFrame(rec, d) {
  rec.lastFrame = { frame: d.frame, seq: d.seq, photoSeq: d.photo_seq ?? 0, fps: d.fps };
  rec.frameImage = d.image;
  rec.frames += 1;
  if (typeof d.fps === "number") rec.fps = d.fps;
}

function failStart(key, rec, message) {
  rec.state = "off";
  rec.error = `live did not start: ${message}`;
  canvasOfKey(key)?.renderLive();
}

/** Route the pack's websocket events to the palette widgets. Called once, from the extension's setup(). */
export function installLiveRouting() {
  // a workflow's nodes are configured before its tab becomes the active one (loading, switching tabs):
  // once it is, show each palette the live display of its own tab
  const loadGraphData = app.loadGraphData;
  app.loadGraphData = async function (...args) {
    const result = await loadGraphData.apply(this, args);
    for (const node of allNodes()) node.rccaCanvas?.renderLive();
    return result;
  };
  api.addEventListener("executed", (event) => {
    const infos = event.detail?.output?.rcca_live;
    if (!Array.isArray(infos)) return;
    const token = workflowOfPrompt.get(event.detail?.prompt_id) ?? workflowToken(); // Run: the tab shown
    for (const info of infos) {
      if (!info?.session || info.palette_node == null) continue;
      const key = recordKey(token, info.palette_node);
      const rec = liveRecord(key);
      if (rec.cancelStart) { // Live was switched off while the graph was still queued
        rec.cancelStart = false;
        api.fetchApi(`/rcca/live/${info.session}/stop`, { method: "POST" }).catch(() => {});
        continue;
      }
      // queueing again (Run, or Live) replaces the session; the old one's late events are ignored
      if (rec.session && rec.session !== info.session) keyOfSession.delete(rec.session);
      Object.assign(rec, { session: info.session, state: "running", reason: "", error: "", width: info.width,
                           height: info.height, lastEditSeq: null, photoSeq: 0, frames: 0, promptId: null });
      keyOfSession.set(info.session, key);
      // the node renders its first frame before it reports the session, so that frame came first
      const early = earlyFrames.get(info.session);
      earlyFrames.delete(info.session);
      if (early) applyFrame(rec, early);
      const canvas = canvasOfKey(key);
      if (canvas?.usePhoto && canvas.background) canvas.sendPhoto(); // the trace image, as the photo to draw over
      canvas?.renderLive();
    }
  });
  api.addEventListener("rcca.live.frame", (event) => {
    const d = event.detail;
    if (!d?.session) return;
    const key = keyOfSession.get(d.session);
    if (key == null) {
      earlyFrames.set(d.session, d);
      if (earlyFrames.size > 8) earlyFrames.delete(earlyFrames.keys().next().value);
      return;
    }
    applyFrame(liveRecord(key), d);
    canvasOfKey(key)?.renderLive();
  });
  api.addEventListener("rcca.live.status", (event) => {
    const d = event.detail;
    const key = d?.session ? keyOfSession.get(d.session) : null;
    if (key == null) return;
    const rec = liveRecord(key);
    if (rec.session !== d.session) return;
    rec.state = d.state ?? rec.state;
    rec.reason = d.reason ?? "";
    if (typeof d.fps === "number") rec.fps = d.fps;
    if (typeof d.frames === "number") rec.frames = d.frames;
    if (rec.state === "stopped") {
      keyOfSession.delete(d.session);
      rec.session = null;
    }
    canvasOfKey(key)?.renderLive();
  });
  // the server ends a session whose browser disconnected; after a reconnect, ask which survived
  api.addEventListener("reconnected", () => {
    for (const [key, rec] of liveRecords) {
      const session = rec.session;
      if (!session) continue;
      api.fetchApi(`/rcca/live/${session}`).then((res) => {
        if (res.status !== 404 || rec.session !== session) return;
        keyOfSession.delete(session);
        Object.assign(rec, { session: null, state: "stopped", reason: "the connection to the server was lost" });
        canvasOfKey(key)?.renderLive();
      }).catch(() => {});
    }
  });
  // a Live start that fails in the queue never reports a session: say why on the waiting widgets
  // (a failure of one of our prompts only; an unknown prompt, one queued with Run, counts too)
  const ours = (rec, d) => rec.state === "starting" && (!rec.promptId || !d.prompt_id || rec.promptId === d.prompt_id);
  api.addEventListener("execution_error", (event) => {
    const d = event.detail ?? {};
    for (const [key, rec] of liveRecords) {
      if (ours(rec, d)) failStart(key, rec, `${d.node_type ?? "a node"} failed: ${d.exception_message ?? "see the queue"}`);
    }
  });
  api.addEventListener("execution_interrupted", (event) => {
    for (const [key, rec] of liveRecords) if (ours(rec, event.detail ?? {})) failStart(key, rec, "the prompt was interrupted");
  });
  // our prompt ran to its end without the Live Stream node reporting a session
  api.addEventListener("execution_success", (event) => {
    const d = event.detail ?? {};
    for (const [key, rec] of liveRecords) {
      if (rec.state === "starting" && rec.promptId && rec.promptId === d.prompt_id) {
        failStart(key, rec, "the prompt finished without the Live Stream node reporting a session");
      }
    }
  });
}

// ---- one widget's live client -------------------------------------------------------------------
export class LiveClient {
  constructor(canvas) {
    this.canvas = canvas;
    // baseSession/baseSeq: the last edit the session accepted from this widget (deltas refer to it)
    this.send = { inflight: false, again: false, lastAt: 0, baseSession: null, baseSeq: null };
  }

  /** This node's record key: the workflow tab shown, and the node's execution id in it. */
  get key() {
    const node = this.canvas.node;
    return recordKey(workflowToken(), executionId(node) ?? String(node.id));
  }

  get record() { return liveRecord(this.key); }

  toggle() {
    const rec = this.record;
    if (rec.session || rec.state === "starting") this.stop();
    else this.start();
  }

  /** Queue the graph; its Live Stream node reports the session through "executed". Resolves true
   * once the server accepted the prompt; every other outcome leaves the widget off, saying why. */
  async start() {
    const canvas = this.canvas, key = this.key, rec = this.record;
    rec.error = "";
    rec.cancelStart = false;
    rec.promptId = null;
    const hasStream = [...allNodes()].some((n) => (n.comfyClass ?? n.type) === "RCCALiveStream" && n.mode === 0);
    if (!hasStream) {
      rec.error = "live needs a Live Stream node (rcca_palette) fed by this palette's outputs";
      canvas.renderLive();
      return false;
    }
    if (canvas.stroke == null) canvas.commit();
    rec.state = "starting";
    rec.frames = 0;
    canvas.renderLive();
    const outcome = await this.queue();
    if (rec.state !== "starting") return false; // stopped, failed or started meanwhile
    if (!outcome) {
      failStart(key, rec, "the frontend did not queue the prompt (see its messages)");
      return false;
    }
    // refused outright (400), or accepted without the Live Stream branch (the server runs the valid
    // outputs of a prompt and lists the invalid ones in node_errors)
    const reply = outcome.error ? outcome.error.response : outcome.res;
    const nodeErrors = Object.values(reply?.node_errors ?? {});
    const streamRefused = nodeErrors.some((e) => e.class_type === "RCCALiveStream");
    if (outcome.error || streamRefused) {
      const details = nodeErrors.flatMap((e) => (e.errors ?? []).map((x) => `${e.class_type}: ${x.details || x.message}`));
      const message = !outcome.error ? null
        : typeof reply?.error === "string" ? reply.error : reply?.error?.message ?? outcome.error.message;
      failStart(key, rec, [message, ...details].filter(Boolean).join("; "));
      return false;
    }
    if (reply?.prompt_id) {
      rec.promptId = reply.prompt_id;
      workflowOfPrompt.set(reply.prompt_id, key.slice(0, key.indexOf("|")));
    }
    return true;
  }

  /** app.queuePrompt, watching the api call it makes: it reports neither the server's verdict nor its
   * message (it opens a dialog), and it may return without calling the api at all (an empty graph,
   * a gate) or leave our item to a queueing already in progress. Resolves {res} or {error} from the
   * api call, or null when none came. */
  async queue() {
    const original = api.queuePrompt;
    let settle;
    const called = new Promise((resolve) => { settle = resolve; });
    const watcher = async function (...args) {
      api.queuePrompt = original; // only the first call is ours
      try {
        const res = await original.apply(this, args);
        settle({ res });
        return res;
      } catch (error) {
        settle({ error });
        throw error;
      }
    };
    api.queuePrompt = watcher;
    try {
      await app.queuePrompt(0, 1);
      // still unanswered: another queueing is processing the items, ours among them; wait for it
      const deadline = performance.now() + QUEUE_WAIT_MS;
      for (;;) {
        const done = await Promise.race([called, new Promise((r) => setTimeout(() => r(undefined), 100))]);
        if (done !== undefined) return done;
        if (!app.processingQueue || performance.now() > deadline) return null;
      }
    } catch (error) {
      return { error };
    } finally {
      if (api.queuePrompt === watcher) api.queuePrompt = original;
    }
  }

  async stop() {
    const rec = this.record;
    const session = rec.session;
    if (rec.state === "starting") rec.cancelStart = true;
    rec.state = "off";
    rec.session = null;
    if (session) {
      keyOfSession.delete(session);
      try {
        const res = await api.fetchApi(`/rcca/live/${session}/stop`, { method: "POST" });
        if (!res.ok && res.status !== 404) rec.error = `stop: ${(await res.json().catch(() => ({}))).error ?? `HTTP ${res.status}`}`;
      } catch (e) {
        rec.error = `stop: ${e.message}`;
      }
      rec.state = "stopped";
      rec.reason = "stopped by the user";
    }
    this.canvas.renderLive();
  }

  /** POST the state to the live session: always at a stroke's end (force), at most every
   * LIVE_EDIT_INTERVAL_MS during it; never two requests at once, and the newest state always goes last.
   * The first edit of a session carries the whole state; later ones are deltas against the last
   * accepted edit (README, "Live drawing"): unchanged masks as references, a stroke as the PNG of its
   * bounding box. Any refusal or failure makes the next edit whole again. */
  sendEdit(force) {
    const canvas = this.canvas, rec = this.record, send = this.send;
    if (!rec.session) return;
    const now = performance.now();
    if (send.inflight) {
      send.again ||= force;
      return;
    }
    if (!force && now - send.lastAt < LIVE_EDIT_INTERVAL_MS) return;
    send.inflight = true;
    send.lastAt = now;
    const session = rec.session;
    const baseSeq = send.baseSession === session ? send.baseSeq : null;
    const sent = canvas.regions.slice();
    const body = baseSeq == null ? JSON.stringify({ regions_state: JSON.stringify(canvas.state()) })
      : this.deltaEditBody(session, baseSeq);
    for (const r of sent) r.dirty = null; // from now on, changes count against this edit
    api.fetchApi(`/rcca/live/${session}/edit`, { method: "POST", headers: { "Content-Type": "application/json" }, body })
      .then(async (res) => {
        const reply = await res.json().catch(() => ({}));
        if (session !== rec.session) return;
        if (res.ok) {
          rec.lastEditSeq = reply.seq;
          rec.error = "";
          Object.assign(send, { baseSession: session, baseSeq: reply.seq });
          sent.forEach((r, index) => { r.base = { session, seq: reply.seq, index }; });
          return;
        }
        send.baseSeq = null;
        if (res.status === 409 && reply.full_state_needed) {
          send.again = true; // the server lost track of our base (another edit came in): resend it whole
          return;
        }
        rec.error = `edit refused: ${reply.error ?? `HTTP ${res.status}`}`;
        if (res.status === 404) Object.assign(rec, { session: null, state: "stopped", reason: "" });
      })
      .catch((e) => {
        send.baseSeq = null;
        rec.error = `edit failed: ${e.message}`;
      })
      .finally(() => {
        send.inflight = false;
        canvas.renderLive();
        if (send.again) {
          send.again = false;
          this.sendEdit(true);
        }
      });
  }

  deltaEditBody(session, baseSeq) {
    const canvas = this.canvas;
    const state = canvas.state((r) => {
      // a region removed, then brought back by undo, may hold the place it had in an older edit
      if (r.base?.session !== session || r.base.seq !== baseSeq || r.dirty === "all") return null;
      const patch = r.dirty && canvas.maskPatch(r, r.dirty);
      return patch ? { base: r.base.index, patch } : { base: r.base.index };
    });
    return JSON.stringify({ base_seq: baseSeq, regions_state: JSON.stringify(state) });
  }

  /** Send the photo the frames start from (a PNG data URL), or null to draw without one. */
  sendPhoto(image) {
    const rec = this.record;
    const session = rec.session;
    if (!session) return;
    api.fetchApi(`/rcca/live/${session}/photo`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                  body: JSON.stringify({ image }) })
      .then(async (res) => {
        const reply = await res.json().catch(() => ({}));
        if (session !== rec.session) return;
        if (res.ok) rec.photoSeq = reply.photo_seq;
        else rec.error = `photo refused: ${reply.error ?? `HTTP ${res.status}`}`;
        this.canvas.renderLive();
      })
      .catch((e) => { rec.error = `photo: ${e.message}`; this.canvas.renderLive(); });
  }
}
