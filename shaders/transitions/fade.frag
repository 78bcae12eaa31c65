#version 330
// Transition "fade": the frozen last frame (u_from) fades into the live picture.
// Also used to bake a half-finished morph of a slow scene into one image.
uniform sampler2D u_from;
uniform sampler2D u_input;
uniform float u_progress;
in vec2 uv;
out vec4 frag;
void main() {
    frag = vec4(mix(texture(u_from, uv).rgb, texture(u_input, uv).rgb, u_progress), 1.0);
}
