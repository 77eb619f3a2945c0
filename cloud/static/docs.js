"use strict";
function el(tag, text){const e=document.createElement(tag); if(text) e.textContent=text; return e}
// The dashboard's admin token (same tab), if any: it unlocks the per-webhook details.
const token = sessionStorage.getItem("webhook-connect-admin-token");
const init = token ? {headers: {Authorization: "Bearer " + token}} : {};
fetch("openapi.json", init).then(r => {
  if (!r.ok) throw new Error("openapi.json answered " + r.status);
  return r.json();
}).then(spec => {
  const root = document.getElementById("api"); root.textContent = "";
  const schemes = spec.components.securitySchemes;
  for (const tag of spec.tags) {
    root.append(el("h2", tag.name + ": " + tag.description));
    for (const [path, item] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(item)) {
        if (method === "parameters" || !(op.tags || []).includes(tag.name)) continue;
        const s = el("section"); const h = el("h3");
        h.append(el("span", method.toUpperCase()), " ", el("code", path));
        h.firstChild.className = "m"; s.append(h);
        s.append(el("p", op.summary + (op.description ? ". " + op.description : "")));
        const params = [...(item.parameters || []), ...(op.parameters || [])];
        if (params.length) {
          const ul = el("ul");
          for (const p of params) ul.append(el("li", p.in + " " + p.name +
            (p.description ? ": " + p.description : "")));
          s.append(el("p", "Parameters:"), ul);
        }
        const auth = op.security || [];
        if (auth.length) {
          const ul = el("ul");
          for (const req of auth) {
            ul.append(el("li", Object.keys(req).map(n => {
              const d = schemes[n];
              return n + ": " + d.type + (d.scheme ? " " + d.scheme : "") +
                (d.name ? " (" + d.in + " " + d.name + ")" : "") +
                (d.description ? " — " + d.description : "");
            }).join(" and ")));
          }
          s.append(el("p", "Authentication (one of these lines; all on a line must pass):"), ul);
        }
        if (op.requestBody) {
          const body = op.requestBody.content; const type = Object.keys(body)[0];
          s.append(el("p", "Body: " + type));
          if (body[type].schema && Object.keys(body[type].schema).length)
            s.append(el("pre", JSON.stringify(body[type].schema, null, 2)));
        }
        const ul = el("ul");
        for (const [code, r] of Object.entries(op.responses))
          ul.append(el("li", code + ": " + r.description));
        s.append(el("p", "Answers:"), ul);
        root.append(s);
      }
    }
  }
}).catch(error => {
  const root = document.getElementById("api");
  root.textContent = error.message; root.className = "err";
});
