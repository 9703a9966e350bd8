// Swagger UI for this server's OpenAPI document. A file, not an inline script, so the page
// keeps the dashboard's Content-Security-Policy (scripts from this origin only).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
});
