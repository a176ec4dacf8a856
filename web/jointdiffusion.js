// JointDiffusion front-end extension (served from WEB_DIRECTORY; no network access at run time).
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "jointdiffusion.core",
});
