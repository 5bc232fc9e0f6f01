// Coherence Report: its numbers shown on the node. The server sends them as the node's UI output
// `text` (V3 ui.PreviewText); the chart arrives as a preview image, which the frontend shows by itself.
import { app } from "../../scripts/app.js";

const NODE = "ControlSyncCoherenceReport";

app.registerExtension({
  name: "ControlSync.CoherenceReportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      if (!this.controlsyncReport) {
        const area = document.createElement("textarea");
        area.readOnly = true;
        area.className = "controlsync-report";
        area.style.cssText = "width:100%;height:100%;font-family:monospace;font-size:10px;white-space:pre;";
        const widget = this.addDOMWidget("report_text", "controlsync_report", area, {
          serialize: false,  // display only: never part of the saved widget values
          getValue: () => area.value,
          setValue: (value) => { area.value = value; },
        });
        widget.serialize = false;
        this.controlsyncReport = widget;
      }
      this.controlsyncReport.element.value = text;
    };
  },
});
