// Layers (source, scene, overlay) over black, each with an opacity and a blend mode.
uniform sampler2D u_source;
uniform sampler2D u_scene;
uniform sampler2D u_overlay;
uniform vec2 u_source_fit;    // uv scale that makes the layer cover the output
uniform vec2 u_scene_fit;
uniform vec2 u_overlay_fit;
uniform float u_source_opacity;
uniform float u_scene_opacity;
uniform float u_overlay_opacity;
uniform int u_source_blend;   // 0 normal, 1 add, 2 multiply, 3 screen, 4 difference
uniform int u_scene_blend;
uniform int u_overlay_blend;
uniform sampler2D u_scene_prev; // MORPH: a slow scene's image before its newest one
uniform float u_morph;          // MORPH: 0 = that previous image, 1 = the newest

vec3 blend(vec3 base, vec3 top, int mode) {
    if (mode == 1) return min(base + top, vec3(1.0));
    if (mode == 2) return base * top;
    if (mode == 3) return 1.0 - (1.0 - base) * (1.0 - top);
    if (mode == 4) return abs(base - top);
    return top;
}

vec3 layer(vec3 base, vec2 p, sampler2D tex, vec2 fit, float opacity, int mode) {
    if (opacity <= 0.0) return base;
    vec4 c = texture(tex, (p - 0.5) * fit + 0.5);
    return mix(base, blend(base, c.rgb, mode), opacity * c.a);
}

// The scene layer; while a slow scene's new image arrives (MORPH) it fades in over the
// previous one, so a scene at 2 images a second still moves continuously.
vec3 scene_layer(vec3 base, vec2 p) {
#ifdef MORPH
    if (u_scene_opacity <= 0.0) return base;
    vec2 q = (p - 0.5) * u_scene_fit + 0.5;
    vec4 c = mix(texture(u_scene_prev, q), texture(u_scene, q), u_morph);
    return mix(base, blend(base, c.rgb, u_scene_blend), u_scene_opacity * c.a);
#else
    return layer(base, p, u_scene, u_scene_fit, u_scene_opacity, u_scene_blend);
#endif
}

vec3 composite(vec2 p) {
    vec3 col = vec3(0.0);
    col = layer(col, p, u_source, u_source_fit, u_source_opacity, u_source_blend);
    col = scene_layer(col, p);
#ifdef OVERLAY
    col = layer(col, p, u_overlay, u_overlay_fit, u_overlay_opacity, u_overlay_blend);
#endif
    return col;
}
