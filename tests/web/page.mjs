// The web page in a real headless Chromium (Debian's, driven by Playwright): submit three photos,
// see them complete with the right labels and no photo loaded for the one that failed, filter, open
// one, download the CSV and the MegaDetector file, and see an API error shown. Usage: node page.mjs SINK_URL PHOTOS_URL SCREENSHOT_DIR
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { chromium } from "playwright-core";

const [sink, photos, shots] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium" });
try {
  const page = await (await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } })).newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${sink}/`);

  // An error from the API is shown as it came.
  await page.fill("#urls", "ftp://example.org/reef.jpg");
  await page.click("#send");
  await page.waitForSelector("#error:not([hidden])");
  const error = await page.textContent("#error");
  assert.match(error, /^400 invalid_url: .*ftp/, error);

  const urls = [`${photos}/photos/coffee.png`, `${photos}/photos/chelsea.png`, `${photos}/photos/missing.jpg`];
  await page.fill("#urls", urls.join("\n"));
  assert.equal(await page.textContent("#count"), "3 URLs");
  await page.click("#send");
  await page.waitForSelector('#status[data-done="true"]', { timeout: 120_000 });
  assert.equal(await page.isHidden("#error"), true, "the error is cleared");
  assert.match(await page.textContent("#status"), /^Done: 3 images, 2 classified, 1 failed\./);
  const labels = await page.$$eval("#grid .card .label", (cards) => cards.map((c) => c.textContent));
  assert.equal(labels.length, 3, `${labels}`);
  assert.equal(labels[0], "espresso");
  assert.match(labels[1], /cat|tabby/, labels[1]);
  assert.equal(labels[2], "not found");
  // Only the photos the service fetched are loaded; a failed one shows why instead of its URL.
  const sources = await page.$$eval("#grid .card img", (images) => images.map((i) => i.getAttribute("src")));
  assert.deepEqual(sources, urls.slice(0, 2));
  assert.equal(await page.textContent("#grid .card >> nth=2 >> .no-photo"), "no photo: not found");
  await page.screenshot({ path: `${shots}/results.png`, fullPage: true });

  // Filters: errors only, then a minimum score that only the espresso reaches.
  await page.selectOption("#f-status", "error");
  assert.deepEqual(await page.$$eval("#grid .card .label", (c) => c.map((e) => e.textContent)), ["not found"]);
  await page.selectOption("#f-status", "");
  await page.fill("#f-score", "0.9");
  assert.deepEqual(await page.$$eval("#grid .card .label", (c) => c.map((e) => e.textContent)), ["espresso"]);
  await page.fill("#f-score", "0");

  // A card opens its top-5.
  await page.click("#grid .card >> nth=0");
  await page.waitForSelector("#detail[open]");
  const top5 = await page.$$eval("#d-top5 tbody tr", (rows) => rows.map((r) => r.cells[1].textContent));
  assert.equal(top5.length, 5);
  assert.equal(top5[0], "espresso");
  // And what the photo says of itself: its size from its header, the hash of its bytes.
  const meta = Object.fromEntries(await page.$$eval("#d-meta dt", (dts) => dts.map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  assert.equal(meta["Size"], "600 × 400 px");
  assert.match(meta["SHA-256"], /^[0-9a-f]{64}/);
  await page.screenshot({ path: `${shots}/detail.png` });
  await page.keyboard.press("Escape");
  // The failed one opens without its photo.
  await page.click("#grid .card >> nth=2");
  await page.waitForSelector("#detail[open]");
  assert.equal(await page.getAttribute("#d-image", "src"), null);
  await page.keyboard.press("Escape");

  // The CSV holds one row per image, in order, with the top label.
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#csv")]);
  const csv = readFileSync(await download.path(), "utf8").trim().split("\r\n");
  assert.equal(csv.length, 4, csv.join("\n"));
  assert.ok(csv[0].startsWith("request_id,batch_index,url,status,error_kind,label,index,score"), csv[0]);
  assert.ok(csv[1].includes(",ok,,espresso,967,"), csv[1]);
  assert.ok(csv[3].includes(",error,not_found,"), csv[3]);

  // The field formats come from the sink's export: MegaDetector's, one image per result.
  await page.selectOption("#export-format", "megadetector");
  const [exported] = await Promise.all([page.waitForEvent("download"), page.click("#export")]);
  assert.ok(exported.suggestedFilename().endsWith("-megadetector.json"), exported.suggestedFilename());
  const md = JSON.parse(readFileSync(await exported.path(), "utf8"));
  assert.equal(md.images.length, 3, JSON.stringify(md.images));
  assert.equal(md.info.format_version, "1.6");

  assert.deepEqual(errors, [], "no script errors");
  console.log(JSON.stringify({ ok: true, labels }));
} finally {
  await browser.close();
}
