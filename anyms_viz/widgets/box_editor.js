// BoxEditor front end (anywidget ESM, no build step).
//
// One labelled, coloured box per subject, drawn as SVG over a background. Geometry lives in
// normalized [x0, y0, x1, y1] (origin top-left) throughout; pixels appear only when reading the mouse.
// While dragging, the box is kept locally and redrawn; the model (and so the kernel) gets the new
// boxes once, on pointer-up, so a drag costs one message and one re-generation, not hundreds.

const SVG_NS = "http://www.w3.org/2000/svg";
const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];
const DECIMALS = 4; // boxes go to Python rounded: readable numbers, still far finer than any grid
const MARGIN = 6; // pixels around the canvas, so that handles on its edges show whole

function svgElement(tag, attributes) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) element.setAttribute(name, value);
  return element;
}

function htmlElement(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

const clamp = (value, low, high) => Math.min(Math.max(value, low), high);
const round = (value) => Number(value.toFixed(DECIMALS));

// The box moved by (dx, dy), kept whole inside the canvas.
function movedBox(box, dx, dy) {
  const [x0, y0, x1, y1] = box;
  const shiftX = clamp(dx, -x0, 1 - x1);
  const shiftY = clamp(dy, -y0, 1 - y1);
  return [x0 + shiftX, y0 + shiftY, x1 + shiftX, y1 + shiftY];
}

// The box with the edges named by `handle` ("nw", "e", ...) moved, never smaller than minSize, never outside.
function resizedBox(box, handle, dx, dy, minSize) {
  let [x0, y0, x1, y1] = box;
  if (handle.includes("w")) x0 = clamp(x0 + dx, 0, x1 - minSize);
  if (handle.includes("e")) x1 = clamp(x1 + dx, x0 + minSize, 1);
  if (handle.includes("n")) y0 = clamp(y0 + dy, 0, y1 - minSize);
  if (handle.includes("s")) y1 = clamp(y1 + dy, y0 + minSize, 1);
  return [x0, y0, x1, y1];
}

// The rectangle spanned by two points (both already inside [0, 1]).
function spannedBox(start, end) {
  return [Math.min(start[0], end[0]), Math.min(start[1], end[1]), Math.max(start[0], end[0]), Math.max(start[1], end[1])];
}

function ordinal(n) {
  return n + (n === 1 ? "st" : n === 2 ? "nd" : n === 3 ? "rd" : "th");
}

function isValidBox(box, minSize) {
  if (!box) return false;
  const [x0, y0, x1, y1] = box;
  return x0 >= 0 && y0 >= 0 && x1 <= 1 && y1 <= 1 && x1 - x0 >= minSize && y1 - y0 >= minSize;
}

function render({ model, el }) {
  const root = htmlElement("div", "anyms-box-editor");
  root.tabIndex = 0;
  // Keys pressed here are ours: JupyterLab must not also read "1" as "make this cell a heading".
  root.setAttribute("data-lm-suppress-shortcuts", "true");
  const canvasColumn = htmlElement("div", "anyms-canvas-column");
  const svg = svgElement("svg", { class: "anyms-canvas" });
  const hint = htmlElement("div", "anyms-hint");
  const legend = htmlElement("div", "anyms-legend");
  canvasColumn.append(svg, hint);
  root.append(canvasColumn, legend);
  el.appendChild(root);

  let boxes = (model.get("boxes") || []).map((box) => (box ? [...box] : null));
  let drag = null; // {mode: "draw" | "move" | "resize", subject, handle, start, startBox, previous}

  const names = () => model.get("names") || [];
  const minSize = () => model.get("min_size");
  const selected = () => model.get("selected");

  function canvasSize() {
    const width = model.get("display_width");
    return [width, Math.max(1, Math.round(width / model.get("aspect")))];
  }

  function pointerToNormalized(event) {
    const rect = svg.getBoundingClientRect();
    const [width, height] = canvasSize();
    const x = (event.clientX - rect.left - MARGIN) / width;
    const y = (event.clientY - rect.top - MARGIN) / height;
    return [clamp(x, 0, 1), clamp(y, 0, 1)];
  }

  function select(index) {
    if (index !== selected()) {
      model.set("selected", index);
      model.save_changes();
    }
  }

  function commitBoxes() {
    model.set("boxes", boxes.map((box) => (box ? box.map(round) : null)));
    model.save_changes();
  }

  // Which subject a new drag on the empty canvas draws: the selected one, else the first without a box.
  function subjectToDraw() {
    if (selected() >= 0) return selected();
    return boxes.findIndex((box) => box === null);
  }

  function drawCanvas() {
    const [width, height] = canvasSize();
    svg.setAttribute("width", width + 2 * MARGIN);
    svg.setAttribute("height", height + 2 * MARGIN);
    svg.setAttribute("viewBox", `${-MARGIN} ${-MARGIN} ${width + 2 * MARGIN} ${height + 2 * MARGIN}`);
    hint.style.width = `${width}px`;
    svg.replaceChildren();
    svg.append(svgElement("rect", { x: -MARGIN, y: -MARGIN, width: width + 2 * MARGIN, height: height + 2 * MARGIN, class: "anyms-margin" }));
    const background = model.get("background");
    if (background) {
      svg.append(svgElement("image", {
        href: background, x: 0, y: 0, width, height, preserveAspectRatio: "none", class: "anyms-background",
      }));
    } else {
      svg.append(svgElement("rect", { x: 0, y: 0, width, height, class: "anyms-blank" }));
      for (let i = 1; i < 10; i++) { // a 10% grid helps place boxes on a blank canvas
        svg.append(svgElement("line", { x1: (i * width) / 10, y1: 0, x2: (i * width) / 10, y2: height, class: "anyms-grid" }));
        svg.append(svgElement("line", { x1: 0, y1: (i * height) / 10, x2: width, y2: (i * height) / 10, class: "anyms-grid" }));
      }
    }
    const colors = model.get("colors");
    // Paint in priority order: the subject that owns an overlap is drawn (and clicked) on top.
    for (const index of model.get("order")) {
      const box = boxes[index];
      if (!box) continue;
      const [x0, y0, x1, y1] = box;
      const group = svgElement("g", { class: "anyms-box-group", "data-subject": index });
      const rect = svgElement("rect", {
        x: x0 * width, y: y0 * height, width: (x1 - x0) * width, height: (y1 - y0) * height,
        class: "anyms-box" + (index === selected() ? " anyms-selected" : ""),
        stroke: colors[index], "data-subject": index,
      });
      rect.style.setProperty("--subject-color", colors[index]);
      const label = `${index + 1} ${names()[index]}`;
      const labelWidth = 7 * label.length + 8;
      const labelX = Math.min(x0 * width, width - labelWidth);
      const labelY = y0 * height > 16 ? y0 * height - 16 : y0 * height;
      const labelBackground = svgElement("rect", {
        x: labelX, y: labelY, width: labelWidth, height: 16, fill: colors[index], class: "anyms-label-background",
      });
      const text = svgElement("text", { x: labelX + 4, y: labelY + 12, class: "anyms-label" });
      text.textContent = label;
      group.append(rect, labelBackground, text);
      svg.append(group);
    }
    // Handles last, so that no other box can cover the selected box's handles.
    const active = selected();
    if (active >= 0 && boxes[active]) {
      const [x0, y0, x1, y1] = boxes[active];
      const xs = { w: x0 * width, e: x1 * width, mid: ((x0 + x1) / 2) * width };
      const ys = { n: y0 * height, s: y1 * height, mid: ((y0 + y1) / 2) * height };
      for (const handle of HANDLES) {
        const x = handle.includes("w") ? xs.w : handle.includes("e") ? xs.e : xs.mid;
        const y = handle.includes("n") ? ys.n : handle.includes("s") ? ys.s : ys.mid;
        svg.append(svgElement("rect", {
          x: x - 5, y: y - 5, width: 10, height: 10, class: `anyms-handle anyms-handle-${handle}`,
          "data-handle": handle, "data-subject": active, stroke: colors[active],
        }));
      }
    }
  }

  function drawLegend() {
    legend.replaceChildren();
    const colors = model.get("colors");
    const thumbnails = model.get("thumbnails");
    const order = model.get("order");
    const rank = (index) => order.length - order.indexOf(index); // 1 = owns every overlap
    names().forEach((name, index) => {
      const row = htmlElement("div", "anyms-legend-row" + (index === selected() ? " anyms-selected" : ""));
      row.dataset.subject = index;
      const swatch = htmlElement("span", "anyms-swatch");
      swatch.style.background = colors[index];
      row.append(swatch);
      if (thumbnails[index]) {
        const thumbnail = htmlElement("img", "anyms-thumbnail");
        thumbnail.src = thumbnails[index];
        thumbnail.alt = name;
        row.append(thumbnail);
      }
      const text = htmlElement("span", "anyms-legend-name", `${index + 1} ${name}`);
      const state = htmlElement("span", "anyms-legend-state", boxes[index] ? `overlaps: ${ordinal(rank(index))}` : "no box: drag on the canvas");
      state.title = "where boxes overlap, the 1st subject owns the overlap (▲ / ▼ or ] / [ change it)";
      const raise = htmlElement("button", "anyms-raise", "▲");
      raise.title = "raise priority: this subject owns more overlaps (key ])";
      const lower = htmlElement("button", "anyms-lower", "▼");
      lower.title = "lower priority (key [)";
      const remove = htmlElement("button", "anyms-delete", "✕");
      remove.title = "delete this box (key Delete)";
      remove.disabled = !boxes[index];
      raise.onclick = (event) => { event.stopPropagation(); shiftPriority(index, +1); };
      lower.onclick = (event) => { event.stopPropagation(); shiftPriority(index, -1); };
      remove.onclick = (event) => { event.stopPropagation(); deleteBox(index); };
      row.append(text, state, raise, lower, remove);
      row.onclick = () => { select(index); root.focus({ preventScroll: true }); };
      legend.append(row);
    });
  }

  function drawHint() {
    if (drag) return;
    const target = subjectToDraw();
    const name = target >= 0 ? names()[target] : null;
    hint.textContent = name
      ? `Drag on an empty spot to draw the box of ${target + 1} ${name}. Delete removes it, 1-9 pick a subject.`
      : "Drag a box to move it, its handles to resize it; 1-9 pick a subject, Delete removes its box.";
  }

  function redraw() {
    drawCanvas();
    drawLegend();
    drawHint();
  }

  function deleteBox(index) {
    if (index < 0 || !boxes[index]) return;
    boxes[index] = null;
    commitBoxes();
  }

  // Moves a subject one place up (+1) or down (-1) in the paint order: later owns the overlaps.
  function shiftPriority(index, direction) {
    const order = [...model.get("order")];
    const position = order.indexOf(index);
    const target = position + direction;
    if (target < 0 || target >= order.length) return;
    [order[position], order[target]] = [order[target], order[position]];
    model.set("order", order);
    model.save_changes();
  }

  svg.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    root.focus({ preventScroll: true });
    const point = pointerToNormalized(event);
    const target = event.target;
    const subject = target.dataset.subject !== undefined ? Number(target.dataset.subject) : -1;
    if (target.dataset.handle) {
      drag = { mode: "resize", subject, handle: target.dataset.handle, start: point, startBox: [...boxes[subject]] };
    } else if (subject >= 0 && boxes[subject]) {
      select(subject);
      drag = { mode: "move", subject, start: point, startBox: [...boxes[subject]] };
    } else {
      const drawn = subjectToDraw();
      if (drawn < 0) { // every box is placed and none is selected: a click on the background deselects
        select(-1);
        return;
      }
      select(drawn);
      drag = { mode: "draw", subject: drawn, start: point, previous: boxes[drawn] };
    }
    svg.setPointerCapture(event.pointerId);
    event.preventDefault();
  });

  svg.addEventListener("pointermove", (event) => {
    if (!drag) return;
    const point = pointerToNormalized(event);
    const dx = point[0] - drag.start[0];
    const dy = point[1] - drag.start[1];
    if (drag.mode === "move") boxes[drag.subject] = movedBox(drag.startBox, dx, dy);
    else if (drag.mode === "resize") boxes[drag.subject] = resizedBox(drag.startBox, drag.handle, dx, dy, minSize());
    else boxes[drag.subject] = spannedBox(drag.start, point);
    drawCanvas();
  });

  function endDrag(event) {
    if (!drag) return;
    const finished = drag;
    drag = null;
    if (svg.hasPointerCapture(event.pointerId)) svg.releasePointerCapture(event.pointerId);
    if (finished.mode === "draw" && !isValidBox(boxes[finished.subject], minSize())) {
      // Too small to be a box (a click, or a thin line): keep what was there.
      boxes[finished.subject] = finished.previous;
      redraw();
      return;
    }
    commitBoxes();
  }
  svg.addEventListener("pointerup", endDrag);
  svg.addEventListener("pointercancel", endDrag);

  root.addEventListener("keydown", (event) => {
    const active = selected();
    let handled = true;
    if ((event.key === "Delete" || event.key === "Backspace") && active >= 0) deleteBox(active);
    else if (/^[1-9]$/.test(event.key) && Number(event.key) <= names().length) select(Number(event.key) - 1);
    else if (event.key === "Escape") select(-1);
    else if (event.key === "]" && active >= 0) shiftPriority(active, +1);
    else if (event.key === "[" && active >= 0) shiftPriority(active, -1);
    else if (event.key.startsWith("Arrow") && active >= 0 && boxes[active]) {
      const step = event.shiftKey ? 0.05 : 0.01;
      const dx = event.key === "ArrowLeft" ? -step : event.key === "ArrowRight" ? step : 0;
      const dy = event.key === "ArrowUp" ? -step : event.key === "ArrowDown" ? step : 0;
      boxes[active] = movedBox(boxes[active], dx, dy);
      commitBoxes();
    } else handled = false;
    if (handled) {
      event.preventDefault();
      event.stopPropagation();
    }
  });

  function onBoxesFromModel() {
    if (drag) return; // the drag in progress wins; its end commits
    boxes = (model.get("boxes") || []).map((box) => (box ? [...box] : null));
    redraw();
  }
  model.on("change:boxes", onBoxesFromModel);
  const otherTraits = ["names", "colors", "thumbnails", "order", "selected", "background", "aspect", "display_width"];
  for (const name of otherTraits) model.on(`change:${name}`, redraw);
  redraw();

  return () => {
    model.off("change:boxes", onBoxesFromModel);
    for (const name of otherTraits) model.off(`change:${name}`, redraw);
  };
}

export default { render };
